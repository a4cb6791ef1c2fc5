"""The memory planner: which physical batch x accumulation x remat fits which device, computed.

The PyTorch DCAL our users come from ships a hand-written table (4 x 4 ~14-15 GB, ...). Here
the compiler writes it: `plan` compiles the very train step training runs
(`train_step.jit_train_step`: DCAL with PWCA and GLCA, the optimizer inside optax.MultiSteps,
fp16 loss scaling, the mesh's shardings, donated state) for each candidate, and reads XLA's
buffer assignment of the compiled executable (`memory_analysis()`):

    device memory = arguments + outputs - aliased (the donated state) + temporaries

Targets come from one registry (registry.py): the attached devices (their allocator's limit),
an NVIDIA card described by an XLA GPU target spec (gpu.py: `--target_config
.../h100_sxm.txtpb`; XLA keeps them in xla/backends/gpu/target_config/specs/; the `jax[cuda12]`
wheels), or a Cloud TPU topology (tpu.py: `--target_config tpu:v5e:2x2`; libtpu from
`jax[tpu]`); the deviceless ones compile with JAX_PLATFORMS=cpu. Each gives its devices, the
memory each may use, its peak FLOP/s per precision and what its executables can tell.

FLOPs come from XLA's cost analysis of the same step lowered for the host CPU (deviceless GPU
executables report none; TPU ones report theirs too: measure.py); they include the
recomputation remat adds, so the implied step time (FLOPs / (peak x plan_mfu)) charges remat its
cost. The plan then names the fastest candidate that fits: the least time per effective batch,
ties (within 1 %) to the larger physical batch.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from dca_jax import checks
from dca_jax import config_lib
from dca_jax.errors import PlanError
from dca_jax.plan import registry
from dca_jax.plan.gpu import gpu_target, pool_fraction, read_gpu_spec
from dca_jax.plan.rows import (REMAT_LEVELS, Candidate, Row, candidate_config, candidates,
                                  collective_bytes, device_bytes, format_row, host_flops, judge,
                                  measure, plan, rank_key, recommend, resolve_precision, summary)
from dca_jax.plan.registry import attached_target
from dca_jax.plan.targets import GIB, Target
from dca_jax.plan.tpu import tpu_target

__all__ = ['GIB', 'REMAT_LEVELS', 'Candidate', 'PlanError', 'Row', 'Target', 'apply_auto_batch',
           'attached_target', 'candidate_config', 'candidates', 'collective_bytes',
           'device_bytes', 'format_row', 'gpu_target', 'host_flops', 'judge', 'measure', 'plan',
           'pool_fraction', 'rank_key', 'read_gpu_spec', 'recommend', 'resolve_precision',
           'run_plan', 'summary', 'tpu_target']


def run_plan(config, workdir: str, target_configs: Sequence[str] = (),
             topology: str = '1x1x1') -> list:
  """The `plan` mode: a table per target (`--target_config`: GPU spec paths, tpu:<topology>;
  none: the attached devices), the recommended configuration, `workdir/plan.jsonl`."""
  config = checks.checked(config)
  targets = registry.targets(target_configs, topology, config.plan_memory_gb)
  os.makedirs(workdir, exist_ok=True)
  out_path = os.path.join(workdir, 'plan.jsonl')
  records = []
  for target in targets:
    precision = resolve_precision(config, target)
    print(f'{target.name} ({target.backend}): {target.memory_bytes / GIB:.2f} GiB usable per '
          f'device, {config.plan_memory_margin:.0%} kept free; {config.backbone} '
          f'{"x".join(map(str, config_lib.input_hw(config)))}, {precision}, attention '
          f'{config.attention_impl}, effective batch {config_lib.effective_batch_size(config)}',
          flush=True)
    rows, best, _ = plan(config, target, search=config.plan_search,
                         log=lambda s: print(s, flush=True))
    print('  recommended: ' + summary(best, target, config, config.plan_memory_margin), flush=True)
    for row in rows:
      if row.memory_bytes is None and not row.error:
        continue  # not compiled (plan_search stopped before it)
      rec = row.record(config, target, precision)
      rec['recommended'] = row is best
      records.append(rec)
  with open(out_path, 'a') as f:
    for rec in records:
      f.write(json.dumps(rec, default=float) + '\n')
  print(f'rows appended to {out_path}')
  return records


def apply_auto_batch(config):
  """`auto_batch`: the config with the planned batch x accumulation and remat for the attached
  devices (same effective batch), found by the ranked search; one line says what was chosen."""
  target = attached_target(config.plan_memory_gb)
  rows, best, _ = plan(config, target, search=True, log=lambda s: None)
  if best is None:
    raise PlanError(summary(None, target, config, config.plan_memory_margin)
                    + '; lower the effective batch or the input size')
  print(f'auto_batch: {summary(best, target, config, config.plan_memory_margin)}; '
        f'{len([r for r in rows if r.memory_bytes is not None])} candidate(s) compiled',
        flush=True)
  return candidate_config(config, best.candidate)
