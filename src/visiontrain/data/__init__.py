"""Data: sources (what images and labels exist), transforms, loaders."""

from visiontrain.data.sources import DataBundle, build_data, list_sources

__all__ = ["DataBundle", "build_data", "list_sources"]
