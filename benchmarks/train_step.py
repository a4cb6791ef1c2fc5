"""Speed and memory of the real jitted DCAL train step, on synthetic batches.

Times `dca_jax.train_step.make_train_step` (forward, backward, fp16 loss scaling when asked, the
optax.MultiSteps accumulation and the AdamW update) exactly as the train loop jits it
(`donate_argnums=(0,)`, replicated state, data-sharded batch), over a whole number of
accumulation cycles after an AOT compile and a warm-up cycle. One JSON line per run goes to
stdout and, with `--out`, is appended to a file. No TensorFlow/TFDS is imported
(`dca_jax.data` is never touched).

  # one row: DeiT-Tiny DCAL at 448 px, batch 4, remat on, fp32
  python -m benchmarks.train_step --backbone deit_tiny --size 448 --batch 4 --accum 1 --remat on
  # the SA-only baseline of the same model (M = 0, T = 0)
  python -m benchmarks.train_step --backbone deit_tiny --size 448 --batch 4 --sa_only
  # a tiny backbone (any ViTConfig field): --override width=64 --override depth=2 ...
  # the machine's matmul peak (2 n^3 flops per n x n product)
  python -m benchmarks.train_step --matmul_peak --dtype fp32 --n 2048
  # render JSON lines as a markdown table
  python -m benchmarks.train_step --render results.jsonl
  # DCAL vs SA-only in one process, steps alternating (robust to load from other jobs)
  python -m benchmarks.train_step --backbone deit_tiny --size 448 --batch 4 --pair=--sa_only
  # where the time goes: forward, forward+backward, rollout alone, full step
  python -m benchmarks.train_step --backbone deit_tiny --size 448 --batch 4 --breakdown
  # peer mode: time step / fwd / fwdbwd / matmul on request from stdin (benchmarks/peers.py,
  # benchmarks/run_cpu_peers.sh: ours against timm's step, alternating)
  python -m benchmarks.train_step --backbone deit_tiny --size 448 --batch 4 --sa_only --serve

Fields: compile_s (lower + compile), step_s_{median,min,max,p25,p75} (one micro-step = one
physical batch), images_per_s (batch / median step), images_per_s_wall (all timed images / wall
time), xla_flops_per_image (XLA cost analysis of the compiled micro-step / batch; includes remat
recompute and the rollout, i.e. the FLOPs the hardware executes), achieved_flops_per_s,
xla_temp_bytes & co. (XLA's static buffer assignment of the step), peak memory (GPU/TPU:
allocator `peak_bytes_in_use`; CPU: peak RSS of the process and peak RSS sampled during the
timed steps) and, with --residuals, the bytes the backward pass saves (`saved_residuals` of the
loss, function arguments excluded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import sys
import threading
import time

from dca_jax import config_lib, host_malloc  # noqa: I001  (before jax: see host_malloc)


def parse_overrides(items) -> dict:
  out = {}
  for item in items or ():
    key, _, value = item.partition('=')
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def _keep_freed_memory(argv) -> tuple:
  """main.py's malloc settings for this run's model, read from the flags before jax loads."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument('--backbone', default='deit_tiny')
  pre.add_argument('--size', type=int, default=448)
  pre.add_argument('--batch', type=int, default=4)
  pre.add_argument('--override', action='append', default=[])
  a, _ = pre.parse_known_args(argv)
  run = argparse.Namespace(backbone=a.backbone, input_size=a.size, batch_size=a.batch,
                           backbone_overrides=parse_overrides(a.override))
  return host_malloc.retain_freed_memory(
      one_arena=host_malloc.one_arena_pays(config_lib.activation_elements(run)))


MALLOC_SETTINGS = _keep_freed_memory(sys.argv[1:])

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.machine import cpu_model, loadavg  # noqa: E402
from dca_jax import checks, train_step, xla_cpu  # noqa: E402

DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16, 'fp16': jnp.float16}


# --- helpers -----------------------------------------------------------------------------------


def machine_info() -> dict:
  dev = jax.local_devices()[0]
  return {'backend': jax.default_backend(), 'device': getattr(dev, 'device_kind', str(dev)),
          'num_devices': jax.device_count(), 'cpu': cpu_model(), 'cpu_count': os.cpu_count(),
          'jax': jax.__version__, 'hostname': platform.node(), 'malloc_settings': list(MALLOC_SETTINGS),
          'cpu_dots': xla_cpu.dots_library() if jax.default_backend() == 'cpu' else None}


def stats(times) -> dict:
  t = np.asarray(times, np.float64)
  return {'step_s_median': float(np.median(t)), 'step_s_min': float(t.min()),
          'step_s_max': float(t.max()), 'step_s_p25': float(np.percentile(t, 25)),
          'step_s_p75': float(np.percentile(t, 75))}


def cost_of(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device
    cost = cost[0] if cost else {}
  cost = cost or {}
  out = {'flops': float(cost.get('flops', float('nan'))),
         'bytes_accessed': float(cost.get('bytes accessed', float('nan')))}
  try:
    mem = compiled.memory_analysis()
    for k in ('temp_size_in_bytes', 'argument_size_in_bytes', 'output_size_in_bytes',
              'alias_size_in_bytes', 'generated_code_size_in_bytes'):
      out['xla_' + k.replace('_size_in_bytes', '_bytes')] = int(getattr(mem, k))
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    pass
  return out


class RssSampler:
  """Peak RSS of this process over a region, sampled every `period` seconds (CPU memory)."""

  def __init__(self, period: float = 0.02):
    import psutil  # pylint: disable=g-import-not-at-top
    self._proc, self._period, self.peak = psutil.Process(), period, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._proc.memory_info().rss)
      self._stop.wait(self._period)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._proc.memory_info().rss)


def memory_fields(sampler_peak: int | None) -> dict:
  out = {}
  dev = jax.local_devices()[0]
  try:
    ms = dev.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    ms = {}
  if 'peak_bytes_in_use' in ms:
    out['peak_device_bytes'] = int(ms['peak_bytes_in_use'])
    if 'bytes_limit' in ms:
      out['device_bytes_limit'] = int(ms['bytes_limit'])
  out['peak_rss_bytes'] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
  if sampler_peak:
    out['peak_rss_steps_bytes'] = int(sampler_peak)
  return out


def emit(record: dict, out_path: str | None) -> None:
  line = json.dumps(record, sort_keys=False)
  print(line, flush=True)
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, 'a') as f:
      f.write(line + '\n')


# --- config and model ----------------------------------------------------------------------------
def build_config(args):
  """A config_lib config for this run (the FGVC recipe's knobs, synthetic data)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dca_jax import config_lib  # pylint: disable=g-import-not-at-top
  from dca_jax.models import vit  # pylint: disable=g-import-not-at-top
  overrides = parse_overrides(args.override)
  vcfg = vit.get_variant(args.backbone, overrides)
  c = config_lib.base_config()
  c.backbone = args.backbone
  c.backbone_overrides = ml_collections.ConfigDict(overrides)
  c.num_sa_layers = vcfg.depth
  if args.sa_only:
    args.glca, args.pwca = 0, 0
  c.num_glca_layers = args.glca
  c.num_pwca_layers = vcfg.depth if args.pwca < 0 else min(args.pwca, vcfg.depth)
  c.input_size = args.size
  c.num_classes = args.num_classes
  c.batch_size = args.batch
  c.gradient_accumulation_steps = args.accum
  c.use_gradient_checkpointing = args.remat == 'on'
  c.remat_policy = args.remat_policy
  c.precision = args.precision
  c.attention_impl = args.attention_impl
  c.stochastic_depth_prob = args.drop_path
  c.pretrained_model = ''
  for key, value in parse_overrides(args.set).items():  # any other knob, e.g. glca_pool=mean
    c[key] = value
  checks.checked(c)
  return c, vcfg


def setup(args):
  """(config, vcfg, jitted step, state, batch, model, dtype) exactly as train.Trainer builds them."""
  from dca_jax import distributed, optim  # pylint: disable=g-import-not-at-top
  from dca_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config, vcfg = build_config(args)
  distributed.check_batch_divisible(config.batch_size)
  dtype, precision = distributed.compute_dtype(config.precision)
  mesh = distributed.make_mesh()
  batch_sharding = distributed.data_sharding(mesh)
  model = build_model(config, dtype=dtype)
  tx = optim.make_optimizer(config, steps_per_epoch=1000)
  rng = jax.random.key(args.seed)
  init_rng, step_rng = jax.random.split(rng)
  state, shardings = train_step.create_train_state(config, model, tx, mesh, precision=precision,
                                              rng=init_rng, load_pretrained=False)
  step = train_step.jit_train_step(model, tx, config, dtype=dtype, rng=step_rng, mesh=mesh,
                              shardings=shardings)
  r = np.random.default_rng(args.seed)
  local = {'image': r.standard_normal((config.batch_size, args.size, args.size, 3), np.float32),
           'label': r.integers(0, config.num_classes, (config.batch_size,), np.int32)}
  batch = distributed.global_batch(local, batch_sharding)
  return config, vcfg, step, state, batch, model, dtype, precision


def residual_bytes(model, params, batch, dtype, use_pwca: bool) -> dict:
  """Bytes saved for the backward pass by the loss (abstract trace; nothing is allocated)."""
  from dca_jax import losses  # pylint: disable=g-import-not-at-top
  from dca_jax.models import dcal  # pylint: disable=g-import-not-at-top
  try:
    from jax._src.ad_checkpoint import saved_residuals  # jax 0.10: not re-exported publicly
  except ImportError:  # pragma: no cover
    saved_residuals = jax.ad_checkpoint.saved_residuals
  images, labels = batch['image'].astype(dtype), batch['label']
  partner = dcal.derangement(jax.random.key(1), images.shape[0]) if use_pwca else None

  def loss_fn(p):
    out = model.apply({'params': p}, images, train=True, partner=partner,
                      rngs={'dropout': jax.random.key(2)})
    return losses.dcal_loss(out, labels)[0]

  total = args_bytes = 0
  for aval, desc in saved_residuals(loss_fn, params):
    try:
      itemsize = np.dtype(aval.dtype).itemsize
    except TypeError:  # typed PRNG keys
      itemsize = getattr(aval.dtype, 'itemsize', 8)
    nbytes = int(np.prod(aval.shape)) * itemsize
    total += nbytes
    if desc.startswith('from the argument'):
      args_bytes += nbytes
  return {'residual_bytes': total - args_bytes, 'residual_arg_bytes': args_bytes}


# --- modes ---------------------------------------------------------------------------------------
def run_train_step(args) -> dict:
  load0 = loadavg()
  config, vcfg, step, state, batch, model, dtype, precision = setup(args)
  rec = {'kind': 'train_step', 'label': args.label,
         'backbone': args.backbone, 'overrides': parse_overrides(args.override),
         'size': args.size, 'tokens': vcfg.num_patches(args.size) + 1,
         'batch': config.batch_size, 'accum': config.gradient_accumulation_steps,
         'effective_batch': config.batch_size * config.gradient_accumulation_steps,
         'remat': config.use_gradient_checkpointing,
         'remat_policy': config.remat_policy if config.use_gradient_checkpointing else None,
         'precision': precision, 'glca_M': config.num_glca_layers,
         'pwca_T': config.num_pwca_layers, 'sa_only': bool(args.sa_only),
         'attention_impl': config.attention_impl, 'drop_path': config.stochastic_depth_prob,
         'params': train_step.count_params(state.params)}
  rec.update(machine_info())

  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  rec.update(lower_s=round(t1 - t0, 3), compile_s=round(t2 - t0, 3))
  cost = cost_of(compiled)
  flops_step = cost.pop('flops')
  rec.update(cost)

  accum = config.gradient_accumulation_steps
  cycles = max(1, math.ceil(args.steps / accum))
  for _ in range(args.warmup_cycles * accum):  # warm-up: whole accumulation cycles
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  sampler = RssSampler() if jax.default_backend() == 'cpu' else None
  ctx = sampler if sampler is not None else _Null()
  with ctx:
    flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall0 = time.perf_counter()
    for _ in range(cycles * accum):
      s = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - s)
    wall = time.perf_counter() - wall0
    minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0
  metrics = jax.device_get(metrics)
  st = stats(times)
  rec.update({k: round(v, 5) for k, v in st.items()})
  rec.update(steps_timed=len(times), warmup_steps=args.warmup_cycles * accum,
             images_per_s=round(config.batch_size / st['step_s_median'], 3),
             images_per_s_wall=round(len(times) * config.batch_size / wall, 3),
             xla_flops_per_step=flops_step,
             xla_flops_per_image=flops_step / config.batch_size,
             achieved_flops_per_s=flops_step / st['step_s_median'],
             loss=float(metrics['loss']), finite=bool(np.isfinite(metrics['loss'])),
             optimizer_updates=int(jax.device_get(state.step)) // accum,
             minor_page_faults_per_step=int(minflt / len(times)))
  if precision == 'fp16':
    rec['loss_scale'] = float(metrics.get('loss_scale', float('nan')))
    rec['skipped_steps'] = int(metrics.get('skipped_steps', 0))
  rec.update(memory_fields(sampler.peak if sampler is not None else None))
  if args.residuals:
    rec.update(residual_bytes(model, state.params, batch, dtype,
                              config.num_pwca_layers > 0))
  rec.update(load_start=load0, load_end=loadavg(),
             time=datetime.datetime.now().isoformat(timespec='seconds'),
             command=' '.join(['python', *sys.argv]))
  return rec


class _Null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def time_fn(fn, *a, reps: int = 5):
  out = fn(*a)
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    s = time.perf_counter()
    jax.block_until_ready(fn(*a))
    times.append(time.perf_counter() - s)
  return float(np.median(times)), times


def loss_of(model, config, batch, dtype):
  """params -> the step's loss (forward of every branch + dcal_loss), fixed partner and rngs."""
  from dca_jax import losses  # pylint: disable=g-import-not-at-top
  from dca_jax.models import dcal  # pylint: disable=g-import-not-at-top
  images, labels = batch['image'].astype(dtype), batch['label']
  use_pwca = config.num_pwca_layers > 0
  partner = dcal.derangement(jax.random.key(1), images.shape[0]) if use_pwca else None

  def loss(p):
    out = model.apply({'params': p}, images, train=True, partner=partner,
                      rngs={'dropout': jax.random.key(2)})
    return losses.dcal_loss(out, labels)[0]

  return loss


def run_breakdown(args) -> dict:
  """Median time and XLA FLOPs of the pieces: forward (loss), forward+backward, full step,
  and the rollout alone (the vector chain's CLS row over L [B, N+1, N+1] maps)."""
  from dca_jax.models import dcal  # pylint: disable=g-import-not-at-top
  config, vcfg, step, state, batch, model, dtype, precision = setup(args)
  loss = loss_of(model, config, batch, dtype)
  rec = {'kind': 'breakdown', 'label': args.label, 'backbone': args.backbone,
         'overrides': parse_overrides(args.override), 'size': args.size, 'batch': args.batch,
         'remat': config.use_gradient_checkpointing, 'precision': precision,
         'glca_M': config.num_glca_layers, 'pwca_T': config.num_pwca_layers}
  rec.update(machine_info())
  parts = {'forward': xla_cpu.jit(loss), 'fwd_bwd': xla_cpu.jit(jax.grad(loss))}
  for name, fn in parts.items():
    c = fn.lower(state.params).compile()
    t, _ = time_fn(c, state.params, reps=args.steps)
    rec[f'{name}_s'] = round(t, 4)
    rec[f'{name}_flops'] = cost_of(c)['flops']
  n = vcfg.num_patches(args.size) + 1
  maps = jax.random.uniform(jax.random.key(3), (vcfg.depth, args.batch, n, n), jnp.float32)
  maps = maps / maps.sum(-1, keepdims=True)

  def rollout(maps):   # the CLS row of the L head-mean maps' rollout, as the model computes it
    return dcal.rollout_cls_row([maps[i] for i in range(vcfg.depth)])

  c = xla_cpu.jit(rollout).lower(maps).compile()
  t, _ = time_fn(c, maps, reps=args.steps)
  rec.update(rollout_s=round(t, 4), rollout_flops=cost_of(c)['flops'])
  c = step.lower(state, batch).compile()
  times = []
  for i in range(args.steps + 1):
    s = time.perf_counter()
    state, m = c(state, batch)
    jax.block_until_ready((state, m))
    if i:
      times.append(time.perf_counter() - s)
  rec.update(step_s=round(float(np.median(times)), 4), step_flops=cost_of(c)['flops'],
             load=loadavg(), command=' '.join(['python', *sys.argv]))
  return rec


# Reply lines of --serve start with this; the rest of stdout (library warnings) is ignored.
SERVE_PREFIX = '@@ '


def serve_reply(rec: dict) -> None:
  sys.stdout.write(SERVE_PREFIX + json.dumps(rec) + '\n')
  sys.stdout.flush()


def run_serve(args) -> dict:
  """Peer mode for `benchmarks/peers.py`: compile the step, the loss's forward and
  forward+backward and an n x n matmul, answer one `@@ {ready}` line, then time one command
  per stdin line (`step`, `fwd`, `fwdbwd`, `matmul`; `quit` ends) and answer `@@ {cmd, s,
  minflt, user_s, sys_s, maxrss_mb}` (wall seconds, minor page faults, CPU seconds and peak RSS
  of this process). Between commands the process only waits on stdin, so a coordinator can alternate
  it with another framework's process and load hits both alike."""
  load0 = loadavg()
  t0 = time.perf_counter()
  config, vcfg, step, state, batch, model, dtype, precision = setup(args)
  loss = loss_of(model, config, batch, dtype)
  compiled = step.lower(state, batch).compile()
  parts = {'step': compiled}
  parts['fwd'] = xla_cpu.jit(loss).lower(state.params).compile()
  parts['fwdbwd'] = xla_cpu.jit(jax.grad(loss)).lower(state.params).compile()
  mm_dtype = DTYPES[args.dtype]
  k1, k2 = jax.random.split(jax.random.key(0))
  mats = [jax.random.normal(k, (args.n, args.n), jnp.float32).astype(mm_dtype) for k in (k1, k2)]
  matmul = lambda a, b: jnp.dot(a, b, preferred_element_type=mm_dtype)
  parts['matmul'] = xla_cpu.jit(matmul).lower(*mats).compile()
  compile_s = time.perf_counter() - t0
  costs = {name: cost_of(c) for name, c in parts.items()}
  costs['matmul']['flops'] = 2.0 * args.n ** 3

  box = {'state': state}

  def run(name):
    if name == 'step':
      box['state'], m = compiled(box['state'], batch)
      jax.block_until_ready((box['state'], m))
    elif name == 'matmul':
      jax.block_until_ready(parts['matmul'](*mats))
    else:
      jax.block_until_ready(parts[name](box['state'].params))

  for _ in range(args.warmup_cycles):
    for name in parts:
      run(name)
  ready = {'kind': 'ready', 'framework': 'jax', 'label': args.label, 'backbone': args.backbone,
           'overrides': parse_overrides(args.override), 'size': args.size,
           'tokens': vcfg.num_patches(args.size) + 1, 'batch': config.batch_size,
           'remat': config.use_gradient_checkpointing, 'precision': precision,
           'glca_M': config.num_glca_layers, 'pwca_T': config.num_pwca_layers,
           'drop_path': config.stochastic_depth_prob, 'num_classes': config.num_classes,
           'matmul_n': args.n, 'matmul_dtype': args.dtype, 'compile_s': round(compile_s, 2),
           'flops': {k: c['flops'] for k, c in costs.items()},
           'xla_temp_bytes': {k: c.get('xla_temp_bytes') for k, c in costs.items()},
           'threads': os.cpu_count(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
           'load_start': load0, 'command': ' '.join(['python', *sys.argv])}
  ready.update(machine_info())
  serve_reply(ready)
  for line in sys.stdin:
    name = line.strip()
    if name == 'quit':
      break
    if name not in parts:
      serve_reply({'cmd': name, 'error': f'unknown command; known: {", ".join(parts)}'})
      continue
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    s = time.perf_counter()
    run(name)
    dt = time.perf_counter() - s
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    serve_reply({'cmd': name, 's': dt, 'minflt': r1.ru_minflt - r0.ru_minflt,
                 'user_s': r1.ru_utime - r0.ru_utime, 'sys_s': r1.ru_stime - r0.ru_stime,
                 'maxrss_mb': r1.ru_maxrss / 1024})
  return {'kind': 'serve_done', 'label': args.label}


# Called between building config A and config B in --pair mode (prototype runners outside the
# repo set it to apply a monkeypatch to B only). None: A and B differ only by their flags.
PAIR_HOOK = None


def run_pair(args, parser) -> dict:
  """A/B in one process with alternating timed steps (A, B, A, B, ...), so that load from
  other processes on a shared machine hits both alike; A = the flags, B = the flags + --pair."""
  import copy  # pylint: disable=g-import-not-at-top
  args_b = parser.parse_args(sys.argv[1:] + args.pair.split(), namespace=copy.deepcopy(args))
  args_b.pair = ''
  runs = []
  for i, a in enumerate((args, args_b)):
    if i == 1 and PAIR_HOOK is not None:
      PAIR_HOOK()
    config, vcfg, step, state, batch, *_ = setup(a)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    comp = time.perf_counter() - t0
    for _ in range(a.warmup_cycles * config.gradient_accumulation_steps):
      state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    runs.append(dict(config=config, compiled=compiled, state=state, batch=batch, times=[],
                     compile_s=comp, flops=cost_of(compiled)))
  accum = max(r['config'].gradient_accumulation_steps for r in runs)
  n = max(1, math.ceil(args.steps / accum)) * accum
  load0 = loadavg()
  for _ in range(n):
    for r in runs:
      s = time.perf_counter()
      r['state'], m = r['compiled'](r['state'], r['batch'])
      jax.block_until_ready((r['state'], m))
      r['times'].append(time.perf_counter() - s)
  a_, b_ = runs
  ratios = np.asarray(b_['times']) / np.asarray(a_['times'])
  rec = {'kind': 'pair', 'label': args.label, 'backbone': args.backbone,
         'overrides': parse_overrides(args.override), 'size': args.size, 'batch': args.batch,
         'accum': args.accum, 'remat': args.remat, 'precision': args.precision,
         'a_flags': ' '.join(sys.argv[1:]), 'b_extra_flags': args.pair,
         'b_hook': getattr(PAIR_HOOK, '__doc__', None) if PAIR_HOOK else None, 'steps_each': n}
  for tag, r in (('a', a_), ('b', b_)):
    st = stats(r['times'])
    rec.update({f'{tag}_{k}': round(v, 5) for k, v in st.items()})
    rec[f'{tag}_compile_s'] = round(r['compile_s'], 2)
    rec[f'{tag}_xla_flops_per_step'] = r['flops']['flops']
    rec[f'{tag}_xla_temp_bytes'] = r['flops'].get('xla_temp_bytes')
    rec[f'{tag}_achieved_flops_per_s'] = r['flops']['flops'] / st['step_s_median']
  rec.update(time_ratio_b_over_a=round(rec['b_step_s_median'] / rec['a_step_s_median'], 4),
             time_ratio_b_over_a_pairwise_median=round(float(np.median(ratios)), 4),
             flops_ratio_b_over_a=round(b_['flops']['flops'] / a_['flops']['flops'], 4),
             load_start=load0, load_end=loadavg(),
             time=datetime.datetime.now().isoformat(timespec='seconds'),
             command=' '.join(['python', *sys.argv]))
  rec.update(machine_info())
  return rec


def run_matmul_peak(args) -> dict:
  """FLOP/s of a large jitted n x n x n jnp.dot on random data (median of `reps`)."""
  dtype = DTYPES[args.dtype]
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (args.n, args.n), jnp.float32).astype(dtype)
  b = jax.random.normal(k2, (args.n, args.n), jnp.float32).astype(dtype)
  f = xla_cpu.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
  load0 = loadavg()
  t, times = time_fn(f, a, b, reps=args.reps)
  flops = 2.0 * args.n ** 3
  rec = {'kind': 'matmul_peak', 'label': args.label or f'matmul {args.n} {args.dtype}',
         'dtype': args.dtype, 'n': args.n, 'reps': args.reps, 'step_s_median': round(t, 5),
         'step_s_min': round(min(times), 5), 'step_s_max': round(max(times), 5),
         'flops_per_s': flops / t, 'flops_per_s_best': flops / min(times),
         'load_start': load0, 'load_end': loadavg(),
         'time': datetime.datetime.now().isoformat(timespec='seconds'),
         'command': ' '.join(['python', *sys.argv])}
  rec.update(machine_info())
  return rec


# --- rendering -----------------------------------------------------------------------------------
def _gb(x):
  return '' if x is None else f'{x / 2**30:.2f}'


def _planned_bytes(r):
  """The planner's formula (dca_jax/plan.py) on this row's compiled step: arguments + outputs
  - aliases + temporaries."""
  from dca_jax import plan  # pylint: disable=g-import-not-at-top
  parts = [r.get(f'xla_{k}_bytes') for k in ('argument', 'output', 'alias', 'temp')]
  return None if any(p is None for p in parts) else plan.device_bytes(*parts)


def _plan_key(r, device):
  remat = (r.get('remat_policy') or 'nothing_saveable') if r.get('remat') else 'off'
  return (device, r.get('precision'), r.get('attention_impl'), r.get('batch'), r.get('accum'),
          remat, r.get('glca_M', 1) > 0 or r.get('pwca_T', 1) > 0)


def _deviceless_rows(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                       'plan_gpu.jsonl')) -> dict:
  """The committed deviceless plan rows (tools/gpu_memory_table.py), by (card name, precision,
  attention, batch, accumulation, remat, DCAL): the first lent card checks them."""
  out = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        d = json.loads(line)
        if d.get('num_devices', 1) == 1 and d.get('backbone') == 'vit_base' and \
            d.get('input') == '448x448' and d.get('memory_bytes'):
          out[(d['target'], d['precision'], d['attention_impl'], d['batch_size'],
               d['accumulation'], d['remat'], True)] = d['memory_bytes']
  return out


def render(paths) -> str:
  """A markdown table of train_step rows (+ matmul peak lines) from JSON-lines files."""
  rows = []
  for path in paths:
    with open(path) as f:
      rows += [json.loads(line) for line in f if line.strip()]
  peaks = [r for r in rows if r.get('kind') == 'matmul_peak']
  steps = [r for r in rows if r.get('kind') == 'train_step']
  errors = [r for r in rows if r.get('kind') == 'error']
  peak_by = {}
  for p in peaks:
    peak_by[p['dtype']] = max(peak_by.get(p['dtype'], 0.0), p['flops_per_s'])
  # a row's ceiling: the matmul peak of its compute dtype (fp16 runs at the bf16 rate on tensor
  # cores), else the fp32 one
  row_peak = lambda r: peak_by.get(r['precision'], peak_by.get(
      'bf16' if r['precision'] == 'fp16' else 'fp32', peak_by.get('fp32')))
  peak = bool(peak_by)
  out = []
  for p in peaks:
    out.append(f'- matmul peak ({p["dtype"]}, {p["n"]}x{p["n"]}, {p["device"]}): '
               f'**{p["flops_per_s"] / 1e9:.1f} GFLOP/s** median of {p["reps"]} '
               f'(best {p["flops_per_s_best"] / 1e9:.1f}; load {p["load_start"]}->{p["load_end"]})')
  if out:
    out.append('')
  hdr = ['row', 'backbone', 'px', 'tokens', 'batch x accum', 'remat', 'prec', 'branches', 'attn',
         'compile s', 'step s median [min, max]', 'img/s', 'GFLOP/img (XLA)', 'achieved GFLOP/s']
  if peak:
    hdr.append('% of matmul peak (same dtype)')
  hdr += ['peak mem GB', 'predicted GB (plan formula, this card)', 'predicted GB (deviceless)',
          'XLA temp GB', 'bwd residuals GB', 'load']
  deviceless = _deviceless_rows()
  out.append('| ' + ' | '.join(hdr) + ' |')
  out.append('|' + '---|' * len(hdr))
  for r in steps:
    ov = ''.join(f' {k}={v}' for k, v in (r.get('overrides') or {}).items())
    branches = 'SA only' if r['glca_M'] == 0 and r['pwca_T'] == 0 else \
        f'DCAL (M={r["glca_M"]}, T={r["pwca_T"]})'
    mem = r.get('peak_device_bytes', r.get('peak_rss_bytes'))
    memtxt = _gb(mem) + ('' if 'peak_device_bytes' in r else ' (RSS)')
    cells = [r.get('label') or '', r['backbone'] + ov, str(r['size']), str(r['tokens']),
             f'{r["batch"]} x {r["accum"]}',
             (r['remat_policy'] if r['remat'] else 'off'), r['precision'], branches,
             r['attention_impl'], f'{r["compile_s"]:.1f}',
             f'{r["step_s_median"]:.3f} [{r["step_s_min"]:.3f}, {r["step_s_max"]:.3f}]',
             f'{r["images_per_s"]:.3g}', f'{r["xla_flops_per_image"] / 1e9:.3g}',
             f'{r["achieved_flops_per_s"] / 1e9:.1f}']
    if peak:
      pk = row_peak(r)
      cells.append(f'{100 * r["achieved_flops_per_s"] / pk:.0f}%' if pk else '')
    cells += [memtxt, _gb(_planned_bytes(r)), _gb(deviceless.get(_plan_key(r, r.get('device')))),
              _gb(r.get('xla_temp_bytes')), _gb(r.get('residual_bytes')),
              f'{r.get("load_start", "")}->{r.get("load_end", "")}']
    out.append('| ' + ' | '.join(cells) + ' |')
  # DCAL / SA-only ratios for matching configs.
  key = lambda r: (r['backbone'], json.dumps(r.get('overrides')), r['size'], r['batch'],
                   r['accum'], r['remat'], r['precision'])
  sa = {key(r): r for r in steps if r['glca_M'] == 0 and r['pwca_T'] == 0}
  ratios = []
  for r in steps:
    if (r['glca_M'] or r['pwca_T']) and key(r) in sa:
      s = sa[key(r)]
      ratios.append(f'- {r["backbone"]} {r["size"]} px, batch {r["batch"]}x{r["accum"]}, remat '
                    f'{"on" if r["remat"] else "off"}, {r["precision"]}, attn '
                    f'{r["attention_impl"]}: DCAL/SA step time '
                    f'**{r["step_s_median"] / s["step_s_median"]:.2f}x**, XLA FLOP ratio '
                    f'{r["xla_flops_per_step"] / s["xla_flops_per_step"]:.2f}x '
                    f'(paper training time 3.8 h / 2.1 h = 1.8x)')
  if ratios:
    out += ['', 'DCAL / SA-only:'] + ratios
  pairs = [r for r in rows if r.get('kind') == 'pair']
  if pairs:
    out += ['', '| A/B (one process, steps alternating) | B = A + | A step s | B step s | '
            'B/A time (pairwise median) | B/A XLA FLOPs | A GFLOP/s | B GFLOP/s | load |',
            '|---|---|---|---|---|---|---|---|---|']
    for r in pairs:
      b_what = r['b_extra_flags'] if r['b_extra_flags'] != '--seed=0' else ''
      b_what = ' '.join(filter(None, [b_what, r.get('b_hook') or '']))
      out.append(f'| {r["label"]} | {b_what} | {r["a_step_s_median"]:.3f} | '
                 f'{r["b_step_s_median"]:.3f} | {r["time_ratio_b_over_a"]:.3f} '
                 f'({r["time_ratio_b_over_a_pairwise_median"]:.3f}) | '
                 f'{r["flops_ratio_b_over_a"]:.3f} | {r["a_achieved_flops_per_s"] / 1e9:.1f} | '
                 f'{r["b_achieved_flops_per_s"] / 1e9:.1f} | {r["load_start"]}->{r["load_end"]} |')
  for e in errors:
    out.append(f'- row `{e.get("label")}` failed: {e.get("error", "")[:300]}')
  return '\n'.join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--backbone', default='deit_tiny')
  p.add_argument('--override', action='append', default=[],
                 help='ViTConfig field=value (repeatable), e.g. width=64 depth=2 num_heads=2')
  p.add_argument('--set', action='append', default=[],
                 help='config knob=value (repeatable), e.g. glca_pool=mean')
  p.add_argument('--size', type=int, default=448, help='input side in px')
  p.add_argument('--batch', type=int, default=4, help='physical batch')
  p.add_argument('--accum', type=int, default=1, help='gradient accumulation steps')
  p.add_argument('--remat', choices=('on', 'off'), default='on')
  p.add_argument('--remat_policy', default='nothing_saveable',
                 help="'full' or a jax.checkpoint_policies name")
  p.add_argument('--precision', choices=('fp32', 'bf16', 'fp16', 'auto'), default='fp32')
  p.add_argument('--glca', type=int, default=1, help='M (0 disables GLCA)')
  p.add_argument('--pwca', type=int, default=-1, help='T (-1 = depth; 0 disables PWCA)')
  p.add_argument('--sa_only', action='store_true', help='M = 0, T = 0')
  p.add_argument('--attention_impl', choices=('xla', 'cudnn'), default='xla')
  p.add_argument('--drop_path', type=float, default=0.1)
  p.add_argument('--num_classes', type=int, default=200)
  p.add_argument('--steps', type=int, default=5,
                 help='timed micro-steps, rounded up to whole accumulation cycles')
  p.add_argument('--warmup_cycles', type=int, default=1)
  p.add_argument('--residuals', action='store_true', help='also trace saved_residuals')
  p.add_argument('--breakdown', action='store_true',
                 help='time forward / forward+backward / rollout / step separately')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--label', default='')
  p.add_argument('--out', default='', help='append the JSON line to this file')
  p.add_argument('--pair', default='',
                 help="A/B mode: B = these extra flags, e.g. --pair=--sa_only; steps alternate")
  p.add_argument('--matmul_peak', action='store_true')
  p.add_argument('--dtype', choices=tuple(DTYPES), default='fp32', help='matmul_peak dtype')
  p.add_argument('--n', type=int, default=2048, help='matmul_peak size')
  p.add_argument('--reps', type=int, default=10, help='matmul_peak repetitions')
  p.add_argument('--render', nargs='+', metavar='JSONL', help='print a markdown table and exit')
  p.add_argument('--serve', action='store_true',
                 help='peer mode for benchmarks/peers.py: time commands read from stdin')
  args = p.parse_args(argv)

  if args.render:
    print(render(args.render))
    return 0
  try:
    if args.matmul_peak:
      rec = run_matmul_peak(args)
    elif args.serve:
      run_serve(args)
      return 0
    elif args.pair:
      rec = run_pair(args, p)
    elif args.breakdown:
      rec = run_breakdown(args)
    else:
      rec = run_train_step(args)
  except Exception as e:  # pylint: disable=broad-except  (OOM etc.: still one JSON line per row)
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    rec = {'kind': 'error', 'label': args.label, 'error': f'{type(e).__name__}: {e}'[:2000],
           'command': ' '.join(['python', *sys.argv]),
           'time': datetime.datetime.now().isoformat(timespec='seconds')}
    emit(rec, args.out)
    return 1
  emit(rec, args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
