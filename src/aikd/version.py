"""The version of aikd (one place: the package metadata, ``aikd --version`` and every file aikd writes read it)."""

__version__ = "0.1.0"
