"""Speed and memory of the train step (dca_jax.train_step.build), one JSON line per process.

The jitted step as training runs it (state donated, batch data-sharded), compiled ahead of time,
warmed up, then timed over whole accumulation cycles on a synthetic batch.

  python -m benchmarks.step_time                     # configs/cub.py: DeiT-T 448 px, batch 4 x 4
  python -m benchmarks.step_time --config configs/cub.py:vit_base --config.input_size=224 \
      --config.batch_size=2 --config.gradient_accumulation_steps=1 --residuals
  python -m benchmarks.step_time --config.num_glca_layers=0 --config.num_pwca_layers=0  # SA only

Fields (docs/BENCHMARKS.md): compile_s, step_s_{median,min,max,p25,p75} (one micro-step),
images_per_s, xla_flops_per_image, achieved_flops_per_s, XLA's buffer assignment
(xla_*_bytes), peak memory, and with --residuals what the backward pass of `Built.loss` keeps.
"""

from __future__ import annotations

import math
import resource
import time

import jax
import numpy as np
from absl import flags

from benchmarks import common
from benchmarks.machine import loadavg

FLAGS = flags.FLAGS


def lower(s: common.Setup):
  """The program timed: the factory's jitted step on this state and batch."""
  return s.built.step.lower(s.state, s.batch)


def timed_steps(compiled, state, batch, steps: int) -> tuple[list, dict]:
  """(seconds per step, what the run left) of `steps` calls, the state threaded through."""
  times, faults, wall = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return times, {'wall': time.perf_counter() - wall, 'state': state,
                 'metrics': jax.device_get(metrics),
                 'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}


def main(config) -> dict:
  load, s = loadavg(), common.setup(config)
  rec = {'kind': 'train_step', **common.describe(s), **common.machine_info()}
  t0 = time.perf_counter()
  lowered = lower(s)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  rec.update(lower_s=round(t1 - t0, 3), compile_s=round(time.perf_counter() - t0, 3))
  rec.update(common.compiled_costs(compiled))
  flops, accum, b = rec.pop('flops'), s.config.gradient_accumulation_steps, s.config.batch_size
  state = s.state
  for _ in range(FLAGS.warmup_cycles * accum):
    state, _ = compiled(state, s.batch)
  steps = max(1, math.ceil(FLAGS.steps / accum)) * accum
  times, run = timed_steps(compiled, jax.block_until_ready(state), s.batch, steps)
  median, metrics = float(np.median(times)), run['metrics']
  rec.update({f'step_s_{k}': round(float(f(times)), 5) for k, f in (
      ('median', np.median), ('min', np.min), ('max', np.max),
      ('p25', lambda t: np.percentile(t, 25)), ('p75', lambda t: np.percentile(t, 75)))})
  rec.update(steps_timed=steps, warmup_steps=FLAGS.warmup_cycles * accum,
             images_per_s=round(b / median, 3), images_per_s_wall=round(steps * b / run['wall'], 3),
             xla_flops_per_step=flops, xla_flops_per_image=flops / b,
             achieved_flops_per_s=flops / median, loss=float(metrics['loss']),
             finite=bool(np.isfinite(metrics['loss'])),
             optimizer_updates=int(run['state'].step) // accum,
             minor_page_faults_per_step=int(run['faults'] / steps), **common.memory_fields())
  if 'loss_scale' in metrics:   # fp16
    rec.update(loss_scale=float(metrics['loss_scale']), skipped_steps=int(metrics['skipped_steps']))
  if FLAGS.residuals:
    rec.update(common.residual_bytes(common.Setup(s.config, s.built, run['state'], s.batch)))
  return {**rec, 'load_start': load, **common.stamp()}


if __name__ == '__main__':
  common.define_step_flags()
  flags.DEFINE_bool('residuals', False, 'also trace what the backward pass saves (Built.loss)')
  common.run(main)
