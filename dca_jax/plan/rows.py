"""Candidates and their measurement: every physical batch x remat the effective batch allows,
the real train step compiled for a target, XLA's buffer assignment read, the fastest that fits.

    device memory = arguments + outputs - aliased (the donated state) + temporaries

FLOPs of the model come from XLA's cost analysis of the same step lowered for the host CPU
(deviceless GPU executables report none); they include the recomputation remat adds. Where the
target's compiled executable reports its own FLOPs per device (TPU), those are recorded too and
used for the implied time; more than the model's means the compiler rematerialised on its own.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Optional, Sequence

import jax
import numpy as np

from dca_jax import config_lib
from dca_jax import distributed
from dca_jax import tasks
from dca_jax import train_step
from dca_jax import xla_costs
from dca_jax.errors import ConfigError, PlanError
from dca_jax.plan.targets import GIB, Target, first_line

# Remat levels from cheapest to most memory-frugal: off, save the weight matmuls' outputs, save
# nothing (the PyTorch code's gradient checkpointing).
REMAT_LEVELS = ('off', 'dots_with_no_batch_dims_saveable', 'nothing_saveable')
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_TIE = 0.01  # step times within 1 % are a tie: the larger physical batch wins
COMPILER_REMAT = 1.02  # compiled FLOPs above the model's by more: the compiler rematerialised
NEAR_LIMIT = 0.8       # ... when the row also uses this share of the device's memory or more


@dataclasses.dataclass(frozen=True)
class Candidate:
  batch_size: int      # physical, global
  accumulation: int
  remat: str           # 'off' or a jax.checkpoint_policies name

  def label(self) -> str:
    return f'{self.batch_size}x{self.accumulation} remat {self.remat}'


def candidates(config, num_devices: int,
               remat_levels: Sequence[str] = REMAT_LEVELS) -> list[Candidate]:
  """Every physical batch that divides the config's effective batch and that the devices (and,
  for Re-ID, P x K batches; for per-device PWCA, >= 2 images per device) can take, x remat."""
  effective = config_lib.effective_batch_size(config)
  task = tasks.get(config.task)
  sizes = []
  for b in range(1, effective + 1):
    if effective % b or b % num_devices:
      continue
    if not task.batch_fits(config, b):  # Re-ID: P x K
      continue
    if not train_step.pwca_batch_fits(config, b, num_devices):
      continue
    sizes.append(b)
  if not sizes:
    raise PlanError(f'no physical batch divides the effective batch {effective} over '
                    f'{num_devices} devices')
  return [Candidate(b, effective // b, r) for b in sizes for r in remat_levels]


def candidate_config(config, candidate: Candidate):
  """`config` with the candidate's batch, accumulation and remat (everything else kept)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.batch_size = candidate.batch_size
    c.gradient_accumulation_steps = candidate.accumulation
    c.use_gradient_checkpointing = candidate.remat != 'off'
    if candidate.remat != 'off':
      c.remat_policy = candidate.remat
  return c


# ============================================================================ compile + measure
def _step_and_args(config, mesh, precision: str):
  """The jitted train step exactly as training builds it (train_step.build), and abstract
  (state, batch)."""
  if not config.num_classes:
    raise PlanError('the plan compiles the classifier too: set --config.num_classes (0 takes '
                    'the count from the data, which only training reads)')
  built = train_step.build(config, mesh, precision=precision, rng=jax.random.key(0))
  return built.step, built.abstract_state, built.abstract_batch()


def host_flops(config, precision: str) -> float:
  """FLOPs of one micro-step over the global batch: XLA's cost analysis of the same step lowered
  for the host CPU, before optimisation (remat's recomputation included). Fused cuDNN attention
  cannot lower on the host; its XLA form has the same FLOPs."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.attention_impl, c.fsdp = 'xla', False
  cpu = jax.devices('cpu')[:1]
  step, state, batch = _step_and_args(c, Mesh(np.asarray(cpu), ('data',)), precision)
  return xla_costs.flops(step.lower(state, batch), default=0.0)


def device_bytes(arguments: int, outputs: int, aliases: int, temporaries: int) -> int:
  """A compiled step's device memory from XLA's buffer assignment: the donated state is both an
  argument and an output (aliased), so it is counted once."""
  return arguments + outputs - aliases + temporaries


def collective_bytes(hlo_text: str) -> dict:
  """Output bytes of each collective kind in an optimised HLO module (per device), each logical
  collective once: the TPU compiler's async collective fusion repeats one all-gather (the same
  channel_id) in every fusion that takes a slice of it, which a count per instruction would
  multiply (17 GB instead of 0.7 GB per chip for FSDP on v5e:4x4)."""
  sizes = {'f32': 4, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'pred': 1, 'f64': 8, 's8': 1,
           'u8': 1, 's64': 8, 'u64': 8}
  out, seen = {}, set()
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(' + '|'.join(_COLLECTIVES) +
                 r')(?:-start)?\(', line)
    if not m:
      continue
    channel = re.search(r'channel_id=(\d+)', line)
    if channel:
      if (m.group(2), channel.group(1)) in seen:
        continue
      seen.add((m.group(2), channel.group(1)))
    total = 0
    for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', m.group(1)):
      if dtype in sizes:
        total += sizes[dtype] * int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
    out[m.group(2)] = out.get(m.group(2), 0) + total
  return out


@dataclasses.dataclass
class Row:
  """One candidate on one target: the compiler's figures and what they imply."""
  candidate: Candidate
  memory_bytes: Optional[int] = None   # per device: arguments + outputs - aliases + temporaries
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  flops: float = float('nan')          # per micro-step, global batch (the model's, host-lowered)
  device_flops: float = float('nan')   # per micro-step per device, compiled (TPU; NaN: unknown)
  compiler_remat: bool = False         # device_flops above the model's share: compiler remat
  windowed_einsum: bool = False        # TPU collective matmuls (their FLOPs not countable)
  collectives: dict = dataclasses.field(default_factory=dict)
  fused_attention: dict = dataclasses.field(default_factory=dict)  # GPU: cuDNN fmha calls
  compile_s: float = 0.0
  error: str = ''
  fits: bool = False
  step_s: float = float('nan')         # implied, one micro-step
  update_s: float = float('nan')       # implied, one effective batch (accumulation x step)

  def record(self, config, target: Target, precision: str) -> dict:
    d = dataclasses.asdict(self)
    cand = d.pop('candidate')
    spec = target.spec if target.spec.startswith('tpu:') else os.path.basename(target.spec)
    return {'backend': target.backend, 'target': target.name, 'spec': spec, 'hosts': target.hosts,
            'num_devices': target.num_devices, 'backbone': config.backbone,
            'input': 'x'.join(map(str, config_lib.input_hw(config))), 'task': config.task,
            'precision': precision, 'attention_impl': config.attention_impl, 'fsdp': config.fsdp,
            'dcal': f'M={config.num_glca_layers} T={config.num_pwca_layers}',
            'batch_size': cand['batch_size'], 'accumulation': cand['accumulation'],
            'remat': cand['remat'], 'memory_gib': _gib(self.memory_bytes),
            'usable_gib': round(target.memory_bytes / GIB, 2),
            'physical_gib': round(target.physical_memory_bytes / GIB, 2), **d}


def _gib(x):
  return None if x is None else round(x / GIB, 3)


def measure(config, candidate: Candidate, target: Target, precision: str, *,
            flops: bool = True) -> Row:
  """Compiles the candidate's train step for `target` and reads its memory (and FLOPs)."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  c = candidate_config(config, candidate)
  row = Row(candidate)
  start = time.time()
  try:
    mesh = Mesh(np.asarray(target.devices), ('data',))
    step, state, batch = _step_and_args(c, mesh, precision)
    compiled = step.lower(state, batch).compile()
    m = compiled.memory_analysis()
    row.argument_bytes, row.output_bytes = m.argument_size_in_bytes, m.output_size_in_bytes
    row.alias_bytes, row.temp_bytes = m.alias_size_in_bytes, m.temp_size_in_bytes
    row.memory_bytes = device_bytes(row.argument_bytes, row.output_bytes, row.alias_bytes,
                                    row.temp_bytes)
    hlo = compiled.as_text() or ''
    if target.num_devices > 1:
      row.collectives = collective_bytes(hlo)
    for field, value in (target.inspect_hlo(hlo) if target.inspect_hlo else {}).items():
      setattr(row, field, value)
    # The TPU's windowed einsums (collective matmuls of FSDP) run their dots in loops that the
    # cost analysis counts once: their FLOPs would read low, so the model's stand instead.
    row.windowed_einsum = 'windowed_dot_general' in hlo
    if target.reports_flops and not row.windowed_einsum:
      row.device_flops = xla_costs.flops(compiled)
  except Exception as e:  # pylint: disable=broad-except  (a row that cannot compile is a row)
    row.error = first_line(e)
  row.compile_s = round(time.time() - start, 1)
  if flops and not row.error:
    row.flops = host_flops(c, precision)
  return row


def judge(row: Row, target: Target, precision: str, margin: float, mfu: float) -> Row:
  """Whether the row fits the target with `margin` of its pool kept free, and its implied time."""
  row.fits = (row.memory_bytes is not None
              and row.memory_bytes <= target.memory_bytes * (1.0 - margin))
  per_device = row.flops / target.num_devices
  if math.isfinite(row.device_flops):  # what the chip runs, the compiler's remat included
    # Near its memory limit the TPU compiler rematerialises instead of failing; far from it,
    # more FLOPs than the model's are padding (small matrices on 128-wide units), not remat.
    near_limit = (row.memory_bytes or 0) >= NEAR_LIMIT * target.memory_bytes
    row.compiler_remat = near_limit and row.device_flops > per_device * COMPILER_REMAT
    per_device = row.device_flops
  peak = target.peak_flops.get(precision)
  if peak and math.isfinite(per_device):
    row.step_s = per_device / (peak * mfu)
    row.update_s = row.step_s * row.candidate.accumulation
  return row


def rank_key(row: Row):
  """Sort key of the preference: least FLOPs per effective batch (time where the peak is
  known), within 1 % the larger physical batch."""
  cost = row.update_s if math.isfinite(row.update_s) else row.flops * row.candidate.accumulation
  if not math.isfinite(cost):  # no FLOPs: prefer no remat, then the larger batch
    cost = float(REMAT_LEVELS.index(row.candidate.remat) if row.candidate.remat in REMAT_LEVELS
                 else len(REMAT_LEVELS))
    return (cost, -row.candidate.batch_size)
  return (round(math.log(max(cost, 1e-12)) / math.log1p(_TIE)), -row.candidate.batch_size)


def recommend(rows: Sequence[Row]) -> Optional[Row]:
  """The fastest row that fits (`rank_key`), or None."""
  fitting = [r for r in rows if r.fits]
  return min(fitting, key=rank_key) if fitting else None


# ============================================================================ the plan
def resolve_precision(config, target: Target) -> str:
  """'auto' means bf16 on a GPU (fp16 on pre-Ampere cards, which have no bf16 units) and on a
  TPU, fp32 on a CPU; what the target's platform cannot run is one line."""
  try:
    distributed.check_platform(config.precision, config.attention_impl, target.platform)
  except ConfigError as e:
    raise PlanError(f'{target.name}: {e}') from None
  if config.precision != 'auto':
    return config.precision
  if target.platform == 'cpu':
    return 'fp32'
  if target.peak_flops and 'bf16' not in target.peak_flops:
    return 'fp16'
  return 'bf16'


def plan(config, target: Target, *, remat_levels: Sequence[str] = REMAT_LEVELS,
         search: bool = False, log=print) -> tuple[list[Row], Optional[Row], str]:
  """Rows for the candidates on `target` and the recommended one.

  search=False compiles every candidate (the table); search=True compiles them in order of
  preference, ranked by their host FLOPs, and stops at the first that fits (`auto_batch`).
  """
  precision = resolve_precision(config, target)
  margin, mfu = config.plan_memory_margin, config.plan_mfu
  cands = candidates(config, target.num_devices, remat_levels)
  if search:
    rows = [Row(c, flops=host_flops(candidate_config(config, c), precision)) for c in cands]
    for i in sorted(range(len(rows)), key=lambda i: rank_key(rows[i])):
      measured = measure(config, rows[i].candidate, target, precision, flops=False)
      measured.flops = rows[i].flops
      rows[i] = judge(measured, target, precision, margin, mfu)
      log(format_row(rows[i], target))
      if rows[i].fits:
        break
  else:
    rows = []
    for c in cands:
      rows.append(judge(measure(config, c, target, precision), target, precision, margin, mfu))
      log(format_row(rows[-1], target))
  return rows, recommend(rows), precision


def format_row(row: Row, target: Target) -> str:
  c = row.candidate
  if row.error:
    return f'  {c.label():<44} error: {row.error}'
  if row.memory_bytes is None:
    return f'  {c.label():<44} not compiled'
  fits = 'fits' if row.fits else 'does not fit'
  flops = f'{row.flops / 1e12:7.2f} TFLOP/step' if math.isfinite(row.flops) else ''
  time_s = f'{row.update_s * 1e3:8.0f} ms/update' if math.isfinite(row.update_s) else ''
  comm = ''
  if row.collectives:
    comm = f'  collectives {sum(row.collectives.values()) / 2**20:.0f} MiB'
  if row.compiler_remat:
    comm += '  (the compiler rematerialised: more FLOPs than the model)'
  return (f'  {c.label():<44} {row.memory_bytes / GIB:7.2f} GiB of {target.memory_bytes / GIB:.1f}'
          f'  {fits:<12} {flops} {time_s}{comm}  (compiled in {row.compile_s:.0f} s)')


def summary(best: Optional[Row], target: Target, config, margin: float) -> str:
  effective = config_lib.effective_batch_size(config)
  if best is None:
    return (f'{target.name}: nothing fits effective batch {effective} in '
            f'{target.memory_bytes / GIB:.1f} GiB with {margin:.0%} kept free')
  c = best.candidate
  return (f'{target.name}: batch_size={c.batch_size} gradient_accumulation_steps='
          f'{c.accumulation} ' + ('use_gradient_checkpointing=False' if c.remat == 'off' else
                                  f'use_gradient_checkpointing=True remat_policy={c.remat}')
          + f' ({best.memory_bytes / GIB:.2f} GiB of {target.memory_bytes / GIB:.1f})')
