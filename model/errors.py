"""Errors the model package raises for problems a user can fix."""


class ModelLoadError(Exception):
    """A model could not be loaded; the message says what to fix (one line, no traceback needed)."""
