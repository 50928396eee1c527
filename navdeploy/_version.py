"""The package version, in one place: pyproject.toml reads it, and manifests and generated files record it."""

__version__ = "0.1.0"
