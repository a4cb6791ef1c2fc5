"""The `eval` mode: restore an Orbax checkpoint and report top-1 on the whole test split."""

from __future__ import annotations

import json
import os

import jax

from dca_jax import checkpoint as ckpt_lib
from dca_jax import train


def restored_trainer(config, workdir: str, which: str = 'latest') -> train.Trainer:
  """A read-only Trainer holding the `latest` or `best` checkpoint of `workdir`."""
  directory = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise ckpt_lib.CheckpointError(f'no checkpoint in {directory}: train into this --workdir first')
  trainer = train.Trainer(config, workdir, read_only=True)
  step = trainer.checkpointer.best_step() if which == 'best' else trainer.checkpointer.latest_step()
  if step is None:
    raise ckpt_lib.CheckpointError(f'no {which} checkpoint in {directory}')
  trainer.restore(step)
  trainer.restored_step = step
  return trainer


def run_eval(config, workdir: str, which: str = 'latest') -> dict:
  trainer = restored_trainer(config, workdir, which)
  result = trainer.evaluate()
  result.update(step=int(trainer.restored_step), checkpoint=which)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump(result, f, indent=2)
    parts = [f'SA+GLCA {result["accuracy"]:.4f}', f'SA {result["accuracy_sa"]:.4f}']
    if 'accuracy_glca' in result:
      parts.append(f'GLCA {result["accuracy_glca"]:.4f}')
    print(f'eval ({which} checkpoint, step {result["step"]}) top-1: ' + ', '.join(parts)
          + f' on {result["num_images"]} test images -> {os.path.join(workdir, "eval.json")}')
  trainer.checkpointer.close()
  return result
