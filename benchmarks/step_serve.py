"""Our step as a peer of benchmarks/peers.py: compile, then time commands read from stdin.

Compiles the train step (dca_jax.train_step.build), the forward and forward+backward of its
loss (`Built.loss`) and an n x n matmul, then serves them (`machine.serve`: `step`, `fwd`,
`fwdbwd`, `matmul`, each answered with its seconds, page faults, CPU seconds and peak RSS).

  python -m benchmarks.step_serve --config.num_glca_layers=0 --config.num_pwca_layers=0 \
      --config.use_gradient_checkpointing=false --config.gradient_accumulation_steps=1
"""

from __future__ import annotations

import os
import time

from absl import flags

from benchmarks import common
from benchmarks.machine import loadavg, serve
from dca_jax import train_step

FLAGS = flags.FLAGS


def main(config) -> None:
  load, start = loadavg(), time.perf_counter()
  s = common.setup(config)
  calls, costs = common.parts(s, FLAGS.n, FLAGS.dtype)
  compile_s = time.perf_counter() - start
  for _ in range(FLAGS.warmup_cycles):
    for call in calls.values():
      call()
  serve({'kind': 'ready', 'framework': 'jax', **common.describe(s), 'matmul_n': FLAGS.n,
         'matmul_dtype': FLAGS.dtype, 'compile_s': round(compile_s, 2),
         'flops': {k: c['flops'] for k, c in costs.items()},
         'xla_temp_bytes': {k: c.get('xla_temp_bytes') for k, c in costs.items()},
         'threads': os.cpu_count(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
         'load_start': load, **common.stamp(), **common.machine_info()}, calls)


if __name__ == '__main__':
  common.define_step_flags()
  flags.DEFINE_enum('dtype', 'fp32', list(train_step.DTYPES), "the matmul's dtype")
  flags.DEFINE_integer('n', 2048, "the matmul's side")
  common.run(main)
