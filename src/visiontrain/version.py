"""The package version, in a module of its own.

Any module can read it without importing the public API (which imports everything).
"""

__version__ = "0.1.0"
