"""The one way dca_jax imports TensorFlow (the input pipeline's): lazily, quietly, GPUs hidden.

JAX owns the accelerators, so every GPU is hidden from TensorFlow. Its import prints start-up
noise through absl's C++ logging, below any level TF_CPP_MIN_LOG_LEVEL governs (each of the two
libraries that carry a copy of absl prints both lines); the import runs with the file
descriptor 2 captured and passes on every line but those (a warning or an error of the import
still reaches the user). oneDNN itself stays on: its line is only dropped, never its numerics
changed. Callers bind the module to a local: `tf = tensorflow()`; code that imports a library
built on TensorFlow (tensorflow_datasets, flax.metrics.tensorboard) calls it first.
"""

from __future__ import annotations

import os
import sys
import tempfile

_TF = None
STARTUP_NOISE = ('All log messages before absl::InitializeLog() is called',
                 'oneDNN custom operations are on')


def _import_quietly():
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(keepends=True):
        if not any(noise in line for noise in STARTUP_NOISE):
          sys.stderr.write(line)
      sys.stderr.flush()
  return tf


def tensorflow():
  """Returns the `tensorflow` module, imported on first use (quietly, GPUs hidden)."""
  global _TF
  if _TF is None:
    tf = sys.modules.get('tensorflow') or _import_quietly()
    try:
      tf.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):  # Already initialised by someone else: nothing to do.
      pass
    _TF = tf
  return _TF
