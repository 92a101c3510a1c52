"""The package version, in the one place the build (hatch) and the modules read it from."""

__version__ = "0.1.0"
