"""The package version, at the bottom of the layers so that any part may report it."""

__version__ = "0.1.0"
