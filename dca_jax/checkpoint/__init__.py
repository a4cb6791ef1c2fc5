"""Orbax checkpoints: async saves, keep the latest N plus the best by eval score, restore.

Each checkpoint holds the full train state (params, neck statistics, optimizer and accumulation
state, loss scale, step) and a JSON `meta` item describing the model, so that restoring into a
model of another backbone or class count fails with one clear line before anything is touched.
Inference restores the params and neck statistics alone (`restore_variables`).

Integrity. Orbax writes each step into a temporary directory and renames it when complete, so a
save cut short (kill -9, full disk) never shows up as a step. Once a step is committed it is
*sealed*: its files are fsynced and `INTEGRITY_FILE` records every file's size and CRC-32. A
step is verified against it before it is restored; a damaged one is named with the reason and
the newest intact one is used instead (training moves the damaged one to
WORKDIR/damaged_checkpoints/, nothing is deleted). Old steps are deleted by this module, only
after a newer step is sealed, so a failed save never costs an earlier checkpoint.

    ckpt = checkpoint.Checkpointer(workdir, keep=2)       # manager.py
    ckpt.save(step, state, checkpoint.model_meta(config, loss_scale=False), score=0.9)
    params = checkpoint.read_run('runs/other')          # runs.py: a run as pretrained weights
"""

from dca_jax.checkpoint.integrity import INTEGRITY_FILE, verify_integrity, write_integrity
from dca_jax.checkpoint.manager import (DAMAGED_DIR, Checkpointer, abstract_like, checkpoint_dir,
                                        model_meta)
from dca_jax.checkpoint.runs import RUN_PREFIX, read_run
from dca_jax.errors import CheckpointError, DamagedCheckpointError, SaveError

__all__ = ['INTEGRITY_FILE', 'DAMAGED_DIR', 'RUN_PREFIX', 'CheckpointError', 'Checkpointer',
           'DamagedCheckpointError', 'SaveError', 'abstract_like', 'checkpoint_dir', 'model_meta',
           'read_run', 'verify_integrity', 'write_integrity']
