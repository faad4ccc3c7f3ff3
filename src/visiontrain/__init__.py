"""visiontrain: train vision models fast, correctly and reproducibly."""

from visiontrain.version import __version__

__all__ = ["__version__"]
