"""What sealing a checkpoint costs on the ViT-B/16 448 px DCAL train state (docs/TRAINING.md):
configs/cub.py:vit_base's state (shapes from `train_step.build`, random values) saved with the
project's Checkpointer, then timed: Orbax's save, the seal (fsync + CRC-32 of every file), the
verification before a restore, and a full restore for scale.

  python -m benchmarks.checkpoint_integrity [--dir /tmp/ckpt_integrity_cost]
"""

import argparse
import os
import shutil
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import cub  # noqa: E402
from dca_jax import checkpoint as ckpt_lib, distributed, train_step  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--dir', default='/tmp/ckpt_integrity_cost')
  args = parser.parse_args()
  shutil.rmtree(args.dir, ignore_errors=True)
  config = cub.get_config("vit_base")
  config.pretrained_model = 'none'
  mesh = distributed.make_mesh()
  built = train_step.build(config, mesh, precision='fp32')
  abstract, shardings = built.abstract_state, built.shardings
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32).astype(x.dtype)
                       if x.shape else np.zeros((), x.dtype), abstract)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  ck = ckpt_lib.Checkpointer(args.dir, keep=2)
  t0 = time.perf_counter()
  ck.save(1, state, {'m': 1}, force=True)
  blocking = time.perf_counter() - t0
  ck.manager.wait_until_finished()
  orbax = time.perf_counter() - t0
  step_dir = ck.step_dir(1)
  t0 = time.perf_counter()
  record = ckpt_lib.write_integrity(step_dir)
  seal = time.perf_counter() - t0
  ck.close()  # the pending step is sealed already; nothing left to do
  on_disk = sum(size for size, _ in record['files'].values())
  t0 = time.perf_counter()
  ok, why = ckpt_lib.verify_integrity(step_dir)
  verify = time.perf_counter() - t0
  assert ok, why
  ro = ckpt_lib.Checkpointer(args.dir, read_only=True)
  t0 = time.perf_counter()
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ro.manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(
      ckpt_lib.abstract_like(abstract, shardings))))
  restore = time.perf_counter() - t0
  ro.close()
  print(f'state: {params / 1e6:.1f}M params, {nbytes / 2**30:.2f} GiB in memory, '
        f'{on_disk / 2**30:.2f} GiB in {len(record["files"])} files on disk')
  print(f'orbax save (blocking part {blocking:.2f} s) until committed: {orbax:.2f} s')
  print(f'seal (fsync + CRC-32 of every file + record): {seal:.2f} s')
  print(f'verify before restore (sizes + CRC-32): {verify:.2f} s')
  print(f'orbax full restore, for scale: {restore:.2f} s')
  shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == '__main__':
  main()
