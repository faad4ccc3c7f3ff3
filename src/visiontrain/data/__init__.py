"""Data: sources (what images and labels exist), transforms, loaders, a user's Datasets."""

from visiontrain.data.sources import DataBundle, build_data, list_sources
from visiontrain.data.user import DatasetSource, from_datasets

__all__ = ["DataBundle", "DatasetSource", "build_data", "from_datasets", "list_sources"]
