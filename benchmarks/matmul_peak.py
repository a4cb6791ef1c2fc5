"""The machine's matmul peak: FLOP/s of a jitted n x n x n jnp.dot (2 n^3 FLOPs), median of
--reps calls; one JSON line (the step tables put each row against it).

  python -m benchmarks.matmul_peak --dtype fp32 --n 2048 --out benchmarks/results/cpu.jsonl
"""

from __future__ import annotations

import numpy as np
from absl import flags

from benchmarks import common
from benchmarks.machine import loadavg
from dca_jax import train_step

FLAGS = flags.FLAGS


def main(config) -> dict:
  del config
  load = loadavg()
  times = common.time_calls(*common.matmul(FLAGS.n, FLAGS.dtype), reps=FLAGS.reps)
  flops, median = 2.0 * FLAGS.n ** 3, float(np.median(times))
  return {'kind': 'matmul_peak', 'label': FLAGS.label or f'matmul {FLAGS.n} {FLAGS.dtype}',
          'dtype': FLAGS.dtype, 'n': FLAGS.n, 'reps': FLAGS.reps, 'step_s_median': round(median, 5),
          'step_s_min': round(min(times), 5), 'step_s_max': round(max(times), 5),
          'flops_per_s': flops / median, 'flops_per_s_best': flops / min(times),
          'load_start': load, **common.stamp(), **common.machine_info()}


if __name__ == '__main__':
  flags.DEFINE_enum('dtype', 'fp32', list(train_step.DTYPES), 'the operands\' and result\'s dtype')
  flags.DEFINE_integer('n', 2048, 'the side of the square operands')
  flags.DEFINE_integer('reps', 10, 'timed calls')
  common.define_record_flags()
  common.run(main)
