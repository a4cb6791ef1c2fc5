"""Where the train step's time goes: the forward and forward+backward of its loss
(`Built.loss`), the rollout alone and the whole step, each the median of --steps calls with
XLA's FLOPs; one JSON line.

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


def rollout(s: common.Setup) -> tuple[float, float]:
  """(median seconds, FLOPs) of the rollout's CLS row over L random row-stochastic maps."""
  depth, n = s.built.model.config.depth, common.tokens(s)
  maps = jax.random.uniform(jax.random.key(3), (depth, s.config.batch_size, n, n))
  maps = maps / maps.sum(-1, keepdims=True)
  fn = common.jit(lambda m: dcal.rollout_cls_row([m[i] for i in range(depth)]), s)
  compiled = fn.lower(maps).compile()
  return float(np.median(common.time_calls(compiled, maps, reps=FLAGS.steps))), \
      xla_costs.flops(compiled)


def main(config) -> dict:
  s = common.setup(config)
  rec = {'kind': 'breakdown', **common.describe(s), **common.machine_info()}
  calls, costs = common.parts(s)
  for name, key in (('fwd', 'forward'), ('fwdbwd', 'fwd_bwd'), ('step', 'step')):
    rec[f'{key}_s'] = float(np.median(common.time_calls(calls[name], reps=FLAGS.steps)))
    rec[f'{key}_flops'] = costs[name]['flops']
  rec['rollout_s'], rec['rollout_flops'] = rollout(s)
  return {**rec, 'load_start': loadavg(), **common.stamp()}


if __name__ == '__main__':
  common.define_step_flags()
  common.run(main)
