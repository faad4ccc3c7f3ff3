"""visiontrain: train vision models fast, correctly and reproducibly."""

__version__ = "0.1.0"
