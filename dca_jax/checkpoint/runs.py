"""A dca_jax run as pretrained weights: the `params` of its newest intact checkpoint.

`config.pretrained_model=<a run's workdir>` (or its checkpoints/ folder, or a step folder) reads
them here, with Orbax and without the optimizer state; dca_jax/weights/ then loads the backbone
and GLCA into another model (its heads are not taken).
"""

from __future__ import annotations

import os
from typing import Dict

import jax
import numpy as np
from absl import logging
import orbax.checkpoint as ocp

from dca_jax.checkpoint import orbax_logs
from dca_jax.checkpoint.integrity import verify_integrity
from dca_jax.checkpoint.manager import Checkpointer, checkpoint_dir
from dca_jax.errors import CheckpointError, WeightLoadError

RUN_PREFIX = 'params/'


def _run_step_dir(path: str) -> str:
  """The step folder that `path` (a workdir, its checkpoints/ folder or a step folder) means:
  for a run, its newest intact (sealed, files matching their record) step."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'state')):
    sealed, why = verify_integrity(path)
    if sealed is False:
      raise WeightLoadError(f'{path}: damaged checkpoint ({why})')
    return path
  workdir = os.path.dirname(path) if os.path.basename(path) == 'checkpoints' else path
  if not os.path.isdir(checkpoint_dir(workdir)):
    raise WeightLoadError(f'{path}: a directory, but not a dca_jax run (no checkpoints/ folder '
                          'nor a step folder with state/)')
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.newest_intact_step('latest')
  except CheckpointError as e:
    raise WeightLoadError(f'{path}: {e}') from None
  finally:
    checkpointer.close()
  if step is None:
    raise WeightLoadError(f'{path}: the run has no intact checkpoint')
  return os.path.join(checkpoint_dir(workdir), str(step))


def read_run(path: str) -> Dict[str, np.ndarray]:
  """The `params` of a dca_jax run's checkpoint as a flat {'params/<our path>': array} dict
  (host numpy, whatever mesh saved it); the optimizer state is not read."""
  step_dir = _run_step_dir(os.fspath(path))
  state_dir = os.path.join(step_dir, 'state')
  # The state item has no step-level metadata file of its own (the step has): Orbax says so.
  quiet = orbax_logs.DropMessage('Metadata file does not exist')
  logging.get_absl_logger().addFilter(quiet)
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    params = tree['params']
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={'params': jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), params)},
        restore_args={'params': jax.tree.map(
            lambda m: ocp.RestoreArgs(restore_type=np.ndarray), params)},
        partial_restore=True))['params']
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises many types)
    first = (str(e).strip().splitlines() or [''])[0][:200]
    raise WeightLoadError(f'{step_dir}: cannot read its params: {type(e).__name__}: '
                          f'{first}') from None
  finally:
    logging.get_absl_logger().removeFilter(quiet)
  flat = jax.tree_util.tree_flatten_with_path(restored)[0]
  return {RUN_PREFIX + '/'.join(str(k.key) for k in keys): np.asarray(value)
          for keys, value in flat}
