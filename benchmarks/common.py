"""What the train-step benchmarks share: the config, the step, its parts, the records.

The step is `dca_jax.train_step.build(config, mesh)`, the factory the trainer and the planner
use, and its loss `Built.loss`: the benchmarks time, count and trace the function that trains,
with random weights (nothing is fetched) on a synthetic uint8 batch of the config's shape. The
config comes as for main.py: `--config configs/<x>.py[:arg]` and `--config.KEY=VALUE`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks.machine import cpu_model, loadavg
from dca_jax import checks, config_lib, distributed, host_malloc, train_step, xla_costs, xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
MALLOC = []   # the host_malloc settings applied (machine_info records them)


def define_step_flags() -> None:
  config_flags.DEFINE_config_file(
      'config', os.path.join(ROOT, 'configs', 'cub.py'), 'the experiment, configs/<x>.py[:arg] '
      '(default: CUB DeiT-T 448 px); any knob as --config.KEY=VALUE', lock_config=True)
  flags.DEFINE_integer('steps', 5, 'timed calls (steps: rounded up to whole accumulation cycles)')
  flags.DEFINE_integer('warmup_cycles', 1, 'accumulation cycles run before timing')
  define_record_flags()


def define_record_flags() -> None:
  flags.DEFINE_string('label', '', 'a name for the row')
  flags.DEFINE_string('out', '', 'append the JSON line to this file too')


def run(main) -> None:
  """absl's app.run of `main(config)`: glibc told to keep freed memory first, as main.py does
  (before XLA's threads exist: dca_jax/host_malloc.py); a failure is still one JSON line."""
  def wrapped(argv):
    del argv
    if not FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)   # optax and Orbax chatter at INFO
    config = FLAGS['config'].value if 'config' in FLAGS else None
    elements = config_lib.activation_elements(config) if config is not None else 0
    MALLOC[:] = host_malloc.retain_freed_memory(one_arena=host_malloc.one_arena_pays(elements))
    try:
      record = main(config)
    except Exception as e:  # pylint: disable=broad-except  (OOM etc.: still one line per row)
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
      emit({'kind': 'error', 'label': FLAGS.label, 'error': f'{type(e).__name__}: {e}'[:2000],
            **stamp()})
      sys.exit(1)
    if record is not None:
      emit(record)
  app.run(wrapped)


@dataclasses.dataclass
class Setup:
  config: object
  built: train_step.Built
  state: train_step.TrainState
  batch: dict


def setup(config) -> Setup:
  """The step as training builds it, its state (random weights) and a batch."""
  config = config.copy_and_resolve_references()
  config.pretrained_model = 'none'
  config = checks.checked(config)
  distributed.check_batch_divisible(config.batch_size)
  built = train_step.build(config, distributed.make_mesh())
  rng, shape = np.random.default_rng(config.seed), built.abstract_batch()
  local = {'image': rng.integers(0, 256, shape['image'].shape, np.uint8),
           'label': rng.integers(0, config.num_classes, shape['label'].shape).astype(np.int32)}
  batch = distributed.global_batch(local, distributed.data_sharding(built.mesh))
  return Setup(config, built, built.init(load_pretrained=False), batch)


def tokens(s: Setup) -> int:
  vit = s.built.model.config
  h, w = config_lib.input_hw(s.config)
  return vit.num_prefix_tokens + vit.grid_size(h) * vit.grid_size(w)


def describe(s: Setup) -> dict:
  """The row's settings, as the tables render them."""
  c, (h, w) = s.config, config_lib.input_hw(s.config)
  return {'label': FLAGS.label, 'config': FLAGS['config'].config_filename, 'task': c.task,
          'backbone': c.backbone, 'overrides': config_lib.backbone_overrides(c),
          'size': h if h == w else f'{h}x{w}', 'tokens': tokens(s), 'batch': c.batch_size,
          'accum': c.gradient_accumulation_steps,
          'effective_batch': c.batch_size * c.gradient_accumulation_steps,
          'remat': c.use_gradient_checkpointing,
          'remat_policy': c.remat_policy if c.use_gradient_checkpointing else None,
          'precision': s.built.precision, 'glca_M': c.num_glca_layers, 'pwca_T': c.num_pwca_layers,
          'attention_impl': c.attention_impl, 'drop_path': c.stochastic_depth_prob,
          'num_classes': c.num_classes, 'params': train_step.count_params(s.state.params)}


def jit(fn, s: Setup | None = None):
  """jax.jit with the options the step compiles with on its platform (dca_jax/xla_cpu.py)."""
  return xla_cpu.jit(fn, platform=s.built.mesh.devices.flat[0].platform if s else None)


def matmul(n: int, dtype: str):
  """A jitted n x n x n product (2 n^3 FLOPs) and its two random operands."""
  dtype = train_step.DTYPES[dtype]
  a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype)
          for k in jax.random.split(jax.random.key(0)))
  return jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype)), a, b


def parts(s: Setup, n: int = 0, dtype: str = 'fp32') -> tuple[dict, dict]:
  """({name: a call that runs it once until ready}, {name: XLA costs}) of the step (its state
  threaded through: it is donated), the forward and forward+backward of its loss (`Built.loss`
  on this batch, a fixed rng) and, with `n`, an n x n matmul."""
  loss = lambda params: s.built.loss(params, s.state.batch_stats, s.batch, jax.random.key(1))[0]
  compiled = {'step': s.built.step.lower(s.state, s.batch).compile(),
              'fwd': jit(loss, s).lower(s.state.params).compile(),
              'fwdbwd': jit(jax.grad(loss), s).lower(s.state.params).compile()}
  box = {'state': s.state}

  def step():
    box['state'], metrics = compiled['step'](box['state'], s.batch)
    jax.block_until_ready((box['state'], metrics))
  calls = {'step': step, 'fwd': lambda: jax.block_until_ready(compiled['fwd'](box['state'].params)),
           'fwdbwd': lambda: jax.block_until_ready(compiled['fwdbwd'](box['state'].params))}
  if n:
    product, a, b = matmul(n, dtype)
    compiled['matmul'] = product.lower(a, b).compile()
    calls['matmul'] = lambda: jax.block_until_ready(compiled['matmul'](a, b))
  costs = {k: compiled_costs(c) for k, c in compiled.items()}
  if n:
    costs['matmul']['flops'] = 2.0 * n ** 3
  return calls, costs


def residuals(built, params, batch_stats, batch) -> list:
  """[(bytes, where, is an argument)] the backward pass of `Built.loss` keeps (an abstract
  trace: the arguments may be ShapeDtypeStructs; nothing is allocated)."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  loss = lambda p, stats, b: built.loss(p, stats, b, jax.random.key(1))[0]
  return [(int(np.prod(aval.shape)) * getattr(aval.dtype, 'itemsize', 8), where,
           where.startswith('from the argument'))
          for aval, where in saved_residuals(loss, params, batch_stats, batch)]


def residual_bytes(s: Setup) -> dict:
  """What the backward pass keeps, function arguments (parameters, images) apart."""
  found = residuals(s.built, s.state.params, s.state.batch_stats, s.batch)
  return {'residual_bytes': sum(n for n, _, arg in found if not arg),
          'residual_arg_bytes': sum(n for n, _, arg in found if arg)}


def compiled_costs(compiled) -> dict:
  """XLA's FLOPs and bytes (dca_jax/xla_costs.py) and its static buffer assignment."""
  out = {'flops': xla_costs.flops(compiled), 'bytes_accessed': xla_costs.bytes_accessed(compiled)}
  try:
    mem = compiled.memory_analysis()
    out.update({f'xla_{k}_bytes': int(getattr(mem, f'{k}_size_in_bytes'))
                for k in ('temp', 'argument', 'output', 'alias', 'generated_code')})
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    pass
  return out


def time_calls(fn, *args, reps: int = 5) -> list:
  """Seconds of `reps` calls of `fn(*args)` after one untimed call, each until ready."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def memory_fields() -> dict:
  """Peak device memory (the GPU/TPU allocator's) and the process's peak RSS."""
  try:
    ms = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (CPU: none)
    ms = {}
  out = {k: int(ms[s]) for k, s in (('peak_device_bytes', 'peak_bytes_in_use'),
                                     ('device_bytes_limit', 'bytes_limit')) if s in ms}
  return {**out, 'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def machine_info() -> dict:
  dev = jax.local_devices()[0]
  return {'backend': jax.default_backend(), 'device': getattr(dev, 'device_kind', str(dev)),
          'num_devices': jax.device_count(), 'cpu': cpu_model(), 'cpu_count': os.cpu_count(),
          'jax': jax.__version__, 'hostname': platform.node(), 'malloc_settings': list(MALLOC),
          'cpu_dots': xla_cpu.dots_library() if jax.default_backend() == 'cpu' else None}


def stamp() -> dict:
  return {'load_end': loadavg(), 'time': datetime.datetime.now().isoformat(timespec='seconds'),
          'command': ' '.join(['python', *sys.argv])}


def emit(record: dict) -> None:
  """The record as one JSON line on stdout and, with --out, appended to that file."""
  line = json.dumps(record)
  print(line, flush=True)
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, 'a') as f:
      f.write(line + '\n')
