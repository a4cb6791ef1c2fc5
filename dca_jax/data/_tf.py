"""Lazy TensorFlow import that hides every GPU from TensorFlow (JAX owns the accelerators)."""

from __future__ import annotations

_TF = None


def tf():
  """Returns the `tensorflow` module, imported on first use with GPUs hidden."""
  global _TF
  if _TF is None:
    import tensorflow as tensorflow  # pylint: disable=g-import-not-at-top
    try:
      tensorflow.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):  # Already initialised by someone else: nothing to do.
      pass
    _TF = tensorflow
  return _TF
