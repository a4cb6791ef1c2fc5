"""Lazy TensorFlow import that hides every GPU from TensorFlow (JAX owns the accelerators).

Callers bind the module to a local: `tf = tensorflow()`.
"""

from __future__ import annotations

_TF = None


def tensorflow():
  """Returns the `tensorflow` module, imported on first use with GPUs hidden."""
  global _TF
  if _TF is None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      tf.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):  # Already initialised by someone else: nothing to do.
      pass
    _TF = tf
  return _TF
