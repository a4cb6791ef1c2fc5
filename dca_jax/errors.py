"""Every error dca_jax reports to a user as one line, in one leaf module.

Each layer raises the error of its concern (a bad config, data, weights, a checkpoint, the
workdir lock, a diverged run); `main.py` prints any of `ONE_LINE` as `error: <message>` and
exits. The classes live here, below every layer, so that a check in one layer can raise the
error another layer is known by without importing it (the layers: docs/ARCHITECTURE.md).
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A configuration that cannot run: an unknown key, a value out of range, a bad pair."""


class DataError(ValueError):
  """A dataset cannot be used as configured (missing folder, inconsistent label file, ...)."""


class ImageLoadError(DataError):
  """A single image file given by the user is missing or cannot be decoded."""


class DataWarning(UserWarning):
  """Images that were skipped (corrupt, truncated, not an image)."""


class WeightLoadError(ValueError):
  """Pretrained weights that cannot be read or do not fit the model."""


class WeightFetchError(WeightLoadError):
  """Pretrained weights named by `pretrained_model` could not be had (one clear line)."""


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored or written as asked."""


class DamagedCheckpointError(CheckpointError):
  """A step whose files do not match its integrity record, or that cannot be read."""

  def __init__(self, directory: str, step: int, reason: str):
    super().__init__(f'checkpoint {directory}/{step} is damaged ({reason})')
    self.step, self.reason = step, reason


class SaveError(CheckpointError):
  """A save that did not complete (full disk, I/O error); earlier steps are untouched."""


class LockError(RuntimeError):
  """Another training holds the workdir."""


class NonFiniteError(RuntimeError):
  """The loss or the weights became NaN/inf (fp16's skipped steps excepted)."""


class PlanError(ValueError):
  """The planner cannot run as asked (a missing CUDA wheel, a bad spec, no candidate)."""


# What main.py turns into one `error:` line (ValueError covers the config, data, weights and
# plan errors, and a user's bad argument; FileNotFoundError a missing file or folder).
ONE_LINE = (ValueError, FileNotFoundError, CheckpointError, LockError, NonFiniteError)
