"""Every program of every mode, compiled for a target without the device.

What a user runs on a card is more than the train step: the eval forwards of each evaluator
(FGVC with and without flip TTA, Re-ID features with the BN neck, the attention pictures), the
predict / embed / visualize forwards and the exported module. Each is built here by the very
function its mode jits — `train_step.build` for training, `evaluators.Suite` for evaluation,
`inference.jit_forward` with the mode's outputs (`inference.MODE_OUTPUTS`) for predict, embed and
visualize (`predict.mode_outputs`), and the `--mode export` module deserialised from its file
(`exported_program`: its cuda or tpu lowering, as a server on the card would compile it) —
lowered on abstract arguments placed on the target's devices and compiled. A program that does
not compile is a row with the compiler's error in one line.

  rows = programs.compile_all(config, target)     # target: plan.registry.targets([...])[0]

`python -m tools.compile_programs` is the command (docs/MEMORY.md, "Every program").
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from dca_jax import config_lib
from dca_jax import distributed
from dca_jax import evaluators
from dca_jax import inference
from dca_jax import predict
from dca_jax import train_step
from dca_jax import xla_costs
from dca_jax.errors import ConfigError
from dca_jax.plan.targets import GIB, Target, first_line

TRAIN_PRECISIONS = {'gpu': ('bf16', 'fp16'), 'tpu': ('bf16', 'fp16'), 'cpu': ('fp32',)}
ATTENTION = {'gpu': ('xla', 'cudnn'), 'tpu': ('xla',), 'cpu': ('xla',)}
KINDS = ('train', 'eval', 'predict', 'embed', 'visualize')


@dataclasses.dataclass
class Program:
  """One program of one mode: how to lower it (a thunk) and what it is."""
  mode: str            # train | eval | predict | embed | visualize | export
  name: str            # e.g. 'train_step', 'eval:test', 'eval:flip', 'predict'
  variant: str         # e.g. 'bf16 remat=on attention=cudnn'
  batch_size: int
  lower: Callable[[], object]   # -> jax.stages.Lowered


def _mesh(target: Target) -> Mesh:
  return Mesh(np.asarray(target.devices), ('data',))


def _variant_config(config, **knobs):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for key, value in knobs.items():
      c[key] = value
  return c


def train_programs(config, target: Target) -> Iterator[Program]:
  """The train step (train_step.build) for each precision x remat x attention the target
  takes: what `--mode train` compiles at start-up, at the config's physical batch."""
  mesh = _mesh(target)
  for precision, remat, attention in itertools.product(
      TRAIN_PRECISIONS[target.platform], (False, True), ATTENTION[target.platform]):
    c = _variant_config(config, use_gradient_checkpointing=remat, attention_impl=attention,
                        precision=precision)
    variant = f'{precision} remat={"on" if remat else "off"} attention={attention}'

    def lower(c=c, precision=precision):
      distributed.check_platform(precision, c.attention_impl, target.platform)
      return train_step.build(c, mesh, precision=precision, rng=jax.random.key(0)).lower()
    yield Program('train', 'train_step', variant, int(c.batch_size), lower)


def _eval_batch(config, batch_size: int, sharding) -> dict:
  """Every key any evaluator's step reads (classification: label, mask; retrieval: camid,
  index; attention: index), abstract, on `sharding`."""
  h, w = config_lib.input_hw(config)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return {'image': spec((batch_size, h, w, 3), jnp.uint8),
          'label': spec((batch_size,), jnp.int32), 'camid': spec((batch_size,), jnp.int32),
          'index': spec((batch_size,), jnp.int32), 'mask': spec((batch_size,), jnp.bool_)}


def _abstract_variables(built: train_step.Built, sharding=None):
  """The trained variables' shapes (params + neck statistics) on their shardings, or all on
  `sharding` (one device: predict, embed, visualize)."""
  variables = built.abstract_state.variables
  if sharding is None:
    return variables
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      variables)


def _built_for_inference(config, target: Target, precision: str) -> train_step.Built:
  c = _variant_config(config, precision=precision)
  return train_step.build(c, _mesh(target), precision=precision, rng=jax.random.key(0))


def eval_programs(config, target: Target) -> Iterator[Program]:
  """Each evaluator of the run (`evaluators.entries`: the task's defaults) as `--mode eval` and
  training's evaluations build it (`Suite`), at config.eval_batch_size over the target's
  devices; per attention implementation the target takes (a shape cuDNN refuses at an eval
  batch shows here) and with the mirrored-image knobs off and on (FGVC's flip TTA evaluator,
  Re-ID's flipped feature). Identical programs are compiled once (`compile_all`)."""
  _, precision = distributed.compute_dtype(   # what the modes compute in on that platform
      config.precision, config.attention_impl, target.platform)
  for attention, flip in itertools.product(ATTENTION[target.platform], (False, True)):
    c = _variant_config(config, test_flip=flip, reid_flip_test=flip, attention_impl=attention)
    built = _built_for_inference(c, target, precision)
    context = evaluators.Context(built.config, built.model, None, built.mesh,
                                 built.shardings.variables, built.dtype)
    batch = _eval_batch(c, int(c.eval_batch_size), context.batch_sharding)
    suite = evaluators.Suite(context)
    variant = f'{precision} attention={attention} flip={"on" if flip else "off"}'
    for name, (_, evaluator) in zip(evaluators.entries(c), suite.members):
      jitted = [v for v in vars(evaluator).values() if callable(v) and hasattr(v, 'lower')]
      for i, fn in enumerate(jitted):
        label = f'eval:{name}' + (f':{i}' if len(jitted) > 1 else '')
        yield Program('eval', label, variant, int(c.eval_batch_size),
                      lambda fn=fn, built=built, batch=batch: fn.lower(
                          _abstract_variables(built), batch))


def forward_programs(config, target: Target, modes: Sequence[str]) -> Iterator[Program]:
  """predict, embed and visualize: `inference.jit_forward` with each mode's outputs, on one
  device (these modes run in one process), at config.eval_batch_size images, per attention
  implementation the target takes."""
  _, precision = distributed.compute_dtype(   # what the modes compute in on that platform
      config.precision, config.attention_impl, target.platform)
  one = SingleDeviceSharding(target.devices[0])
  b = int(config.eval_batch_size)
  h, w = config_lib.input_hw(config)
  images = jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=one)
  for attention in ATTENTION[target.platform]:
    built = _built_for_inference(_variant_config(config, attention_impl=attention), target,
                                 precision)
    for mode in modes:
      outputs = predict.mode_outputs(built.config, mode)
      if not outputs:
        continue  # e.g. embed of an FGVC model: the mode refuses it
      fn = inference.jit_forward(built.model, built.config, built.dtype, outputs,
                                 platform=target.platform)
      yield Program(mode, mode, f'{precision} attention={attention} outputs={",".join(outputs)}',
                    b, lambda fn=fn, built=built: fn.lower(_abstract_variables(built, one),
                                                           images))


def exported_program(path: str, target: Target, batch_size: int) -> Program:
  """A `--mode export` StableHLO file, deserialised, called on `batch_size` images on one
  device of `target`: jax picks the lowering of the target's platform (cuda, tpu or cpu) from
  the multi-platform artifact, as a server would."""
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  image = exported.in_avals[0]
  shape = (batch_size, *image.shape[1:])
  one = SingleDeviceSharding(target.devices[0])
  spec = jax.ShapeDtypeStruct(shape, image.dtype, sharding=one)
  variant = f'platforms={",".join(exported.platforms)}'
  return Program('export', 'exported', variant, batch_size,
                 lambda: jax.jit(exported.call).lower(spec))


def programs(config, target: Target, kinds: Sequence[str] = KINDS) -> list[Program]:
  """The programs of `kinds` (train, eval, predict, embed, visualize) for `config`."""
  unknown = sorted(set(kinds) - set(KINDS))
  if unknown:
    raise ConfigError(f'program kinds {unknown}: known {", ".join(KINDS)}')
  found = []
  if 'train' in kinds:
    found += list(train_programs(config, target))
  if 'eval' in kinds:
    found += list(eval_programs(config, target))
  found += list(forward_programs(config, target, [k for k in KINDS[2:] if k in kinds]))
  return found


# ============================================================================ compile + rows
def compile_row(program: Program, target: Target, config, lowered=None) -> dict:
  """Compiles `program` (lowered already, or now) for `target`: its memory (XLA's buffer
  assignment), FLOPs (the compiled executable's where the backend counts them, else the lowered
  module's) and the time it took; a program that fails is a row with the error's first line."""
  row = {'mode': program.mode, 'program': program.name, 'variant': program.variant,
         'batch_size': program.batch_size, 'target': target.name, 'backend': target.backend,
         'spec': (target.spec if target.spec.startswith('tpu:')
                  else os.path.basename(target.spec)),
         'num_devices': target.num_devices, 'backbone': config.backbone, 'task': config.task,
         'input': 'x'.join(map(str, config_lib.input_hw(config))), 'compiled': False,
         'error': ''}
  start = time.time()
  try:
    lowered = lowered or program.lower()
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    row.update(compiled=True, argument_bytes=m.argument_size_in_bytes,
               output_bytes=m.output_size_in_bytes, alias_bytes=m.alias_size_in_bytes,
               temp_bytes=m.temp_size_in_bytes)
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    row['memory_gib'] = round(total / GIB, 3)
    row['fits'] = total <= target.memory_bytes
    flops = xla_costs.flops(compiled)
    row['flops'] = flops if np.isfinite(flops) and flops > 0 else xla_costs.flops(lowered)
  except Exception as e:  # pylint: disable=broad-except  (a program that cannot compile is a row)
    row['error'] = first_line(e)
  row['compile_s'] = round(time.time() - start, 1)
  return row


def compile_all(config, target: Target, kinds: Sequence[str] = KINDS, *,
                done: Optional[set] = None, log=print) -> Iterator[dict]:
  """Rows of every program of `kinds` compiled for `target`, one at a time (a caller writes
  each as it comes). A program whose lowered module equals an earlier one's (e.g. FGVC's
  single-crop eval with flip TTA on and off) is compiled once. `done`: (program, variant) keys
  to skip (a resumed table)."""
  seen = set()
  for program in programs(config, target, kinds):
    try:  # lowered even when done: a later twin of a done program is known by its text
      lowered = program.lower()
      text = hashlib.sha256(lowered.as_text().encode()).hexdigest()
      if text in seen:
        continue
      seen.add(text)
    except Exception:  # pylint: disable=broad-except  (compile_row reports it as the row's error)
      lowered = None
    if done and (program.name, program.variant) in done:
      continue
    row = compile_row(program, target, config, lowered)
    log(format_row(row))
    yield row


def format_row(row: dict) -> str:
  what = f'{row["program"]:<16} {row["variant"]:<40} batch {row["batch_size"]:<4}'
  if not row['compiled']:
    return f'  {what} error: {row["error"]}'
  return (f'  {what} {row["memory_gib"]:8.2f} GiB  temporaries {row["temp_bytes"] / GIB:7.2f} '
          f'GiB  {row["flops"] / 1e12:8.3f} TFLOP  (compiled in {row["compile_s"]:.0f} s)')
