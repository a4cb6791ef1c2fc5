"""Errors and warnings raised by the input pipeline."""

from __future__ import annotations


class DataError(ValueError):
  """A dataset cannot be used as configured (missing folder, inconsistent label file, ...)."""


class ImageLoadError(DataError):
  """A single image file given by the user is missing or cannot be decoded."""


class DataWarning(UserWarning):
  """Images that were skipped (corrupt, truncated, not an image)."""
