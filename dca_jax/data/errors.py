"""Errors and warnings raised by the input pipeline (declared in dca_jax.errors)."""

from dca_jax.errors import DataError, DataWarning, ImageLoadError  # noqa: F401
