"""The version, written once: ``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``), the package exports it."""

__version__ = "0.1.0"
