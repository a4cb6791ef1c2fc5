"""Where the train step's time goes: the loss's forward, forward+backward, the rollout alone and
the whole step, each timed (median) with XLA's FLOPs; one JSON line.

The loss is the step's own (`Built.loss`: preprocessing, PWCA partners, every branch, the
task's loss terms, the Re-ID necks' statistics) on the step's batch with a fixed rng.

  python -m benchmarks.step_breakdown --config.gradient_accumulation_steps=1 \
      --config.use_gradient_checkpointing=false --steps 3
"""

from __future__ import annotations

import jax
import numpy as np

from benchmarks import common
from benchmarks.machine import loadavg
from dca_jax import xla_costs
from dca_jax.models import dcal

FLAGS = common.FLAGS


def timed(fn, *args) -> tuple[float, float]:
  """(median seconds over --steps calls, XLA's FLOPs) of `fn` compiled for `args`."""
  compiled = fn.lower(*args).compile()
  return float(np.median(common.time_calls(compiled, *args, reps=FLAGS.steps))), \
      xla_costs.flops(compiled)


def rollout_maps(s: common.Setup):
  """L random row-stochastic [B, N+1, N+1] maps (what the rollout's CLS row chain reads)."""
  n = common.tokens(s)
  maps = jax.random.uniform(jax.random.key(3), (s.built.model.config.depth, s.config.batch_size,
                                                n, n))
  return maps / maps.sum(-1, keepdims=True)


def main(config) -> dict:
  s = common.setup(config)
  rec = {'kind': 'breakdown', **common.describe(s), **common.machine_info()}
  loss = common.loss_of(s)
  params = s.state.params
  rec['forward_s'], rec['forward_flops'] = timed(common.jit(loss, s), params)
  rec['fwd_bwd_s'], rec['fwd_bwd_flops'] = timed(common.jit(jax.grad(loss), s), params)
  depth = s.built.model.config.depth
  rollout = common.jit(lambda m: dcal.rollout_cls_row([m[i] for i in range(depth)]), s)
  rec['rollout_s'], rec['rollout_flops'] = timed(rollout, rollout_maps(s))
  compiled = s.built.step.lower(s.state, s.batch).compile()
  box = {'state': s.state}

  def step(batch):   # the state threaded through (it is donated)
    box['state'], metrics = compiled(box['state'], batch)
    return metrics
  rec['step_s'] = float(np.median(common.time_calls(step, s.batch, reps=FLAGS.steps)))
  rec['step_flops'] = xla_costs.flops(compiled)
  return {**rec, 'load': loadavg(), **common.stamp()}


if __name__ == '__main__':
  common.define_step_flags()
  common.run(main)
