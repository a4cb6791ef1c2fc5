"""The memory planner: which physical batch x accumulation x remat fits which device, computed.

The PyTorch DCAL our users come from ships a hand-written table (4 x 4 ~14-15 GB, ...). Here
the compiler writes it: `plan` compiles the very train step training runs
(`train_step.jit_train_step`: DCAL with PWCA and GLCA, the optimizer inside optax.MultiSteps,
fp16 loss scaling, the mesh's shardings, donated state) for each candidate, and reads XLA's
buffer assignment of the compiled executable (`memory_analysis()`):

    device memory = arguments + outputs - aliased (the donated state) + temporaries

The target is either the attached devices (their allocator's limit) or, with no GPU at hand, an
NVIDIA card described by an XLA GPU target spec (`--target_config`, XLA's
`gpu_target_config` text proto; XLA keeps them in xla/backends/gpu/target_config/specs/), for
which JAX compiles "deviceless" (needs the `jax[cuda12]` wheels and JAX_PLATFORMS=cpu).

FLOPs come from XLA's cost analysis of the same step lowered for the host CPU (deviceless GPU
executables report none); they include the recomputation remat adds, so the implied step time
(FLOPs / (peak x plan_mfu)) charges remat its cost. The plan then names the fastest candidate
that fits: the least time per effective batch, ties (within 1 %) to the larger physical batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dca_jax import checks
from dca_jax import config_lib
from dca_jax import distributed
from dca_jax import optim
from dca_jax import tasks
from dca_jax import train_step
from dca_jax.errors import PlanError
from dca_jax.models import build_model

GIB = 2 ** 30
# Remat levels from cheapest to most memory-frugal: off, save the weight matmuls' outputs, save
# nothing (the PyTorch code's gradient checkpointing).
REMAT_LEVELS = ('off', 'dots_with_no_batch_dims_saveable', 'nothing_saveable')
# XLA's PrimitiveType numbers in the spec's matrix_unit_description: precision -> type.
_SPEC_TYPES = {'fp16': 10, 'fp32': 11, 'bf16': 16}
# Dense matrix FLOPs per clock per SM by compute-capability major, for specs without rates
# (NVIDIA's architecture whitepapers): Volta 8 tensor cores x 64 FMA (fp16; no bf16; fp32 on the
# 64 FP32 units), Ampere 4 x 256 FMA (fp16/bf16; fp32 as TF32 at half), Hopper 4 x 512 FMA.
_DENSE_FLOPS_PER_CLOCK_PER_SM = {7: {'fp16': 1024, 'fp32': 128},
                                 8: {'fp16': 2048, 'bf16': 2048, 'fp32': 1024},
                                 9: {'fp16': 4096, 'bf16': 4096, 'fp32': 2048}}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_TIE = 0.01  # step times within 1 % are a tie: the larger physical batch wins


# ============================================================================ targets
@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  backend: str                      # 'gpu-deviceless', or the attached backend ('gpu', 'cpu', ...)
  devices: tuple                    # one per data-parallel rank (deviceless: the topology's)
  memory_bytes: int                 # per device: what the train step may use (JAX's pool)
  physical_memory_bytes: int        # per device, the card's
  peak_flops: dict                  # precision -> dense matrix FLOP/s per device (may be empty)
  spec: str = ''                    # the spec file, for deviceless targets

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def read_gpu_spec(text: str) -> dict:
  """The fields the planner needs from an XLA GPU target spec (text proto)."""
  def field(name, cast=int):
    m = re.search(rf'\b{name}:\s*"?([^"\n]+)"?', text)
    return cast(m.group(1)) if m else None

  cores, memory = field('core_count'), field('device_memory_size')
  if not cores or not memory:
    raise PlanError('not an XLA GPU target spec: core_count / device_memory_size missing')
  peak = {}
  matrix = text.split('matrix_unit_description', 1)[-1].split('}\n  }', 1)[0]
  for key, clock, units, ops in re.findall(
      r'key:\s*(\d+)\s*value\s*\{\s*clock_rate_ghz:\s*([\d.]+)\s*units_per_core:\s*(\d+)\s*'
      r'ops_per_clock:\s*(\d+)', matrix):
    for precision, type_id in _SPEC_TYPES.items():
      if int(key) == type_id:  # an FMA is two FLOPs
        peak[precision] = 2.0 * cores * int(units) * int(ops) * float(clock) * 1e9
  if not peak:  # older specs carry no matrix rates: the architecture's tensor-core rate x clock
    m = re.search(r'cuda_compute_capability\s*\{\s*major:\s*(\d+)', text)
    clock = field('clock_rate_ghz', float)
    rates = _DENSE_FLOPS_PER_CLOCK_PER_SM.get(int(m.group(1)) if m else -1, {})
    if clock:
      peak = {precision: cores * rate * clock * 1e9 for precision, rate in rates.items()}
  return {'cores': cores, 'memory_bytes': memory, 'peak_flops': peak,
          'model': field('model_str', str) or '', 'platform': field('platform_version', str)}


def pool_fraction() -> float:
  """The share of a GPU's memory JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75
  by default); the train step must fit in that pool."""
  if os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE', '').lower() == 'false':
    return 1.0
  return float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 0.75))


def gpu_target(spec_path: str, topology: str = '1x1x1') -> Target:
  """A deviceless NVIDIA target from an XLA GPU spec file and a topology ('1x1x8': 8 GPUs)."""
  try:
    with open(spec_path) as f:
      text = f.read()
  except OSError as e:
    raise PlanError(f'cannot read the GPU target spec {spec_path}: {e.strerror}') from None
  spec = read_gpu_spec(text)
  if jax.default_backend() != 'cpu':
    raise PlanError('a deviceless GPU plan compiles on the host: run it with JAX_PLATFORMS=cpu')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc('dca_jax_plan', 'cuda', target_config=text,
                                        topology=topology)
  except Exception as e:  # pylint: disable=broad-except  (missing plugin, bad proto, ...)
    raise PlanError(f'cannot compile for {os.path.basename(spec_path)}: {first_line(e)} (a '
                    'deviceless GPU plan needs the jax[cuda12] wheels of the same jax version)'
                    ) from None
  name = topo.devices[0].device_kind
  if len(topo.devices) > 1:
    name = f'{len(topo.devices)} x {name}'
  return Target(name=name, backend='gpu-deviceless', devices=tuple(topo.devices),
                memory_bytes=int(spec['memory_bytes'] * pool_fraction()),
                physical_memory_bytes=spec['memory_bytes'], peak_flops=spec['peak_flops'],
                spec=spec_path)


def attached_target(memory_gb: float = 0.0) -> Target:
  """The devices this process sees. Memory: `memory_gb` when set, else the allocator's limit
  (GPU/TPU), else the host's RAM (CPU)."""
  devices = tuple(jax.devices())
  try:
    stats = devices[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (CPU backends may not implement it)
    stats = {}
  physical = int(stats.get('bytes_limit', 0))
  if not physical:
    import psutil  # pylint: disable=g-import-not-at-top
    physical = int(psutil.virtual_memory().total)
  memory = int(memory_gb * GIB) if memory_gb else physical
  return Target(name=devices[0].device_kind, backend=jax.default_backend(), devices=devices,
                memory_bytes=memory, physical_memory_bytes=physical, peak_flops={})


def first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


# ============================================================================ candidates
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
    if (config.num_pwca_layers and config.pwca_partners == 'per_device'
        and b // num_devices < 2):
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
  """The jitted train step exactly as training builds it, and abstract (state, batch)."""
  if not config.num_classes:
    raise PlanError('the plan compiles the classifier too: set --config.num_classes (0 takes '
                    'the count from the data, which only training reads)')
  dtype = {'fp32': jnp.float32, 'bf16': jnp.bfloat16, 'fp16': jnp.float16}[precision]
  model = build_model(config, dtype=dtype)
  tx = optim.make_optimizer(config, steps_per_epoch=1000)  # the schedule does not change shapes
  abstract, shardings = train_step.abstract_train_state(config, model, tx, mesh,
                                                        precision=precision)
  step = train_step.jit_train_step(model, tx, config, dtype=dtype, rng=jax.random.key(0),
                                   mesh=mesh, shardings=shardings)
  batch_sharding = distributed.data_sharding(mesh)
  h, w = config_lib.input_hw(config)
  b = config.batch_size
  batch = {'image': jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)}
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract, shardings)
  return step, state, batch


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
  cost = step.lower(state, batch).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost.get('flops', 0.0)) if cost else float('nan')


def device_bytes(arguments: int, outputs: int, aliases: int, temporaries: int) -> int:
  """A compiled step's device memory from XLA's buffer assignment: the donated state is both an
  argument and an output (aliased), so it is counted once."""
  return arguments + outputs - aliases + temporaries


def collective_bytes(hlo_text: str) -> dict:
  """Output bytes of each collective kind in an optimised HLO module (per device)."""
  sizes = {'f32': 4, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'pred': 1, 'f64': 8, 's8': 1,
           'u8': 1, 's64': 8, 'u64': 8}
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(' + '|'.join(_COLLECTIVES) +
                 r')(?:-start)?\(', line)
    if not m:
      continue
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
  flops: float = float('nan')          # per micro-step, global batch
  collectives: dict = dataclasses.field(default_factory=dict)
  fused_attention: dict = dataclasses.field(default_factory=dict)  # cuDNN fmha calls by name
  compile_s: float = 0.0
  error: str = ''
  fits: bool = False
  step_s: float = float('nan')         # implied, one micro-step
  update_s: float = float('nan')       # implied, one effective batch (accumulation x step)

  def record(self, config, target: Target, precision: str) -> dict:
    d = dataclasses.asdict(self)
    cand = d.pop('candidate')
    return {'backend': target.backend, 'target': target.name, 'spec': os.path.basename(target.spec),
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
    for name in re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', hlo):
      row.fused_attention[name] = row.fused_attention.get(name, 0) + 1
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
  peak = target.peak_flops.get(precision)
  if peak and math.isfinite(row.flops):
    row.step_s = row.flops / target.num_devices / (peak * mfu)
    row.update_s = row.step_s * row.candidate.accumulation
  return row


def rank_key(row: Row):
  """Sort key of the preference: least FLOPs per effective batch (time where the peak is
  known), within 1 % the larger physical batch."""
  cost = row.flops * row.candidate.accumulation
  if not math.isfinite(cost):  # no FLOPs: prefer no remat, then the larger batch
    cost = float(REMAT_LEVELS.index(row.candidate.remat) if row.candidate.remat in REMAT_LEVELS
                 else len(REMAT_LEVELS))
    return (cost, -row.candidate.batch_size)
  return (round(math.log(max(cost, 1.0)) / math.log1p(_TIE)), -row.candidate.batch_size)


def recommend(rows: Sequence[Row]) -> Optional[Row]:
  """The fastest row that fits (`rank_key`), or None."""
  fitting = [r for r in rows if r.fits]
  return min(fitting, key=rank_key) if fitting else None


# ============================================================================ the plan
def resolve_precision(config, target: Target) -> str:
  """'auto' means bf16 on a GPU (fp16 on pre-Ampere cards, which have no bf16 units)."""
  if config.precision != 'auto':
    return config.precision
  if target.backend == 'cpu':
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


def run_plan(config, workdir: str, spec_paths: Sequence[str], topology: str = '1x1x1') -> list:
  """The `plan` mode: a table per target, the recommended configuration, `workdir/plan.jsonl`."""
  config = checks.checked(config)
  targets = ([gpu_target(p, topology) for p in spec_paths] if spec_paths
             else [attached_target(config.plan_memory_gb)])
  os.makedirs(workdir, exist_ok=True)
  out_path = os.path.join(workdir, 'plan.jsonl')
  records = []
  for target in targets:
    precision = resolve_precision(config, target)
    print(f'{target.name} ({target.backend}): {target.memory_bytes / GIB:.1f} GiB usable per '
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
