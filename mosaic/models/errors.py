"""Exceptions raised by the model zoo (both are ValueErrors, so callers may catch either)."""

__all__ = ["ModelError", "CheckpointError"]


class ModelError(ValueError):
    """A model could not be built or inspected: unknown name, bad option, no pretrained weights, bad layer."""


class CheckpointError(ValueError):
    """A checkpoint could not be read, or its tensors do not fit the model they are loaded into."""
