"""The package version, on the bottom floor so the CLI can name it without the package surface."""

__version__ = "0.1.0"
