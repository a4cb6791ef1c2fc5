"""Inference: a trained model restored from a workdir, and the ONE forward every consumer shares.

    restored = inference.load_for_inference(config, workdir, 'latest')   # params (+ neck stats)
    fn = inference.forward_fn(restored.model, config, restored.dtype, ('probs', 'rollout'))
    out = jax.jit(fn)(restored.variables, uint8_images)                 # {'probs', 'rollout'}

The evaluators (dca_jax/evaluators/), the predict and visualize modes and the export mode all
call `forward_fn`, so "normalise the uint8 pixels, apply the model, pick the outputs" is written
once: what eval scores is what predict prints, what export serialises and what visualize draws.
`predict.Predictor` wraps it with a restored checkpoint for batches of images on the host.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dca_jax import checkpoint as ckpt_lib
from dca_jax import config_lib
from dca_jax import distributed
from dca_jax import xla_cpu
from dca_jax.data import preprocess
from dca_jax.models import build_model, dcal

# What `forward_fn` can return, per image:
#   probs        [C]  FGVC: (softmax(SA) + softmax(GLCA)) / heads: the SA+GLCA prediction
#   sa_probs     [C]  softmax of the SA head; glca_probs: of the GLCA head (when GLCA is on)
#   sa_logits, glca_logits [C]
#   feature      [D]  Re-ID: the retrieval feature exactly as evaluated (the config's
#                     reid_feature / reid_flip_test / reid_normalize)
#   rollout      [1+N] the SA rollout's CLS row GLCA selects from; glca_index [R]: the selection
OUTPUTS = ('probs', 'sa_probs', 'glca_probs', 'sa_logits', 'glca_logits', 'feature', 'rollout',
           'glca_index')
_SELECTION = ('rollout', 'glca_index')


def forward_fn(model, config, dtype, outputs: Sequence[str]):
  """(variables, images uint8 [B, H, W, 3]) -> {name: array} of `outputs` (see OUTPUTS).

  Pure and unjitted: callers jit it with their shardings, or export it. Outputs a model has no
  head for (GLCA off) are left out."""
  outputs = tuple(outputs)
  unknown = sorted(set(outputs) - set(OUTPUTS))
  if unknown:
    raise ValueError(f'unknown inference output(s) {unknown}; known: {", ".join(OUTPUTS)}')
  normalization = config_lib.resolve_normalization(config)
  with_selection = any(k in _SELECTION for k in outputs)
  after_bn = config.reid_feature == 'after_bn'

  def apply(variables, pixels):
    return model.apply(variables, pixels, train=False, with_selection=with_selection)

  def forward(variables, images):
    pixels = preprocess.device_normalize(images, normalization, dtype)
    out = apply(variables, pixels)
    res = {}
    heads = 2.0 if 'glca_logits' in out else 1.0
    for name in outputs:
      if name == 'probs':  # softmax(SA) + softmax(GLCA) sums to `heads`: -> probabilities
        res[name] = dcal.predict_probs(out) / heads
      elif name in ('sa_probs', 'glca_probs'):
        logits = out.get(name.replace('probs', 'logits'))
        if logits is not None:
          res[name] = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      elif name == 'feature':
        res[name] = _retrieval_feature(apply, variables, pixels, out, config, after_bn)
      elif name in out:
        res[name] = out[name]
    return res

  return forward


def jit_forward(model, config, dtype, outputs: Sequence[str], *, platform: str | None = None):
  """`forward_fn` jitted as the predict, embed and visualize modes run it (one device, the
  variables and images as given); the program compiler (dca_jax/programs.py) compiles the same."""
  return xla_cpu.jit(forward_fn(model, config, dtype, outputs), platform=platform)


def _retrieval_feature(apply, variables, pixels, out, config, after_bn: bool):
  """concat(SA, GLCA) feature; the mirror image's averaged in (before any normalisation)."""
  feature = dcal.reid_feature(out, after_bn=after_bn)
  if config.reid_flip_test:
    mirrored = apply(variables, pixels[:, :, ::-1, :])
    feature = 0.5 * (feature + dcal.reid_feature(mirrored, after_bn=after_bn))
  if config.reid_normalize:
    feature = feature / jnp.maximum(jnp.linalg.norm(feature, axis=-1, keepdims=True), 1e-12)
  return feature


# ============================================================================ restore
@dataclasses.dataclass
class InferenceModel:
  """A restored model for eval/visualize/predict/export: parameters (and neck statistics)."""
  config: Any
  model: Any
  variables: dict
  variables_sharding: Any
  mesh: Any
  dtype: Any
  step: int
  which: str


def _with_saved_classes(config, checkpointer, step: int):
  """`num_classes=0` (from the data): the count the checkpoint was trained with."""
  if config.num_classes:
    return config
  try:
    saved = checkpointer.read_meta(step).get('num_classes')
  except Exception:  # pylint: disable=broad-except  (a damaged step: the restore names it)
    return config
  resolved = copy.deepcopy(config)
  resolved.num_classes = int(saved)
  return resolved


def load_for_inference(config, workdir: str, which: str = 'latest') -> InferenceModel:
  """Restores the `latest` or `best` checkpoint of `workdir` for inference (read-only): no
  optimizer state, no train input, no train step. `config`: checked (dca_jax/checks.py)."""
  directory = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise ckpt_lib.CheckpointError(f'no checkpoint in {directory}: train into this --workdir first')
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    damaged_best = ('; --checkpoint latest uses the newest intact one' if which == 'best' else '')
    try:  # damaged steps are named and skipped (never moved: a training may be writing)
      step = checkpointer.newest_intact_step(which)
    except ckpt_lib.DamagedCheckpointError as e:
      raise ckpt_lib.CheckpointError(f'{e}{damaged_best}') from None
    if step is None:
      raise ckpt_lib.CheckpointError(f'no {"intact " if checkpointer.all_steps() else ""}{which} '
                                     f'checkpoint in {directory}')
    config = _with_saved_classes(config, checkpointer, step)
    dtype, precision = distributed.compute_dtype(config.precision, config.attention_impl)
    model = build_model(config, dtype=dtype)
    mesh = distributed.make_mesh()
    shape = (1, *config_lib.input_hw(config), 3)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                                 train=False))
    sharding = jax.tree.map(lambda x: distributed.state_sharding(mesh, x.shape, config.fsdp),
                            abstract)
    while True:
      try:
        variables = checkpointer.restore_variables(
            step, ckpt_lib.abstract_like(abstract, sharding),
            ckpt_lib.model_meta(config, loss_scale=precision == 'fp16'))
        break
      except ckpt_lib.DamagedCheckpointError as e:  # unreadable files of an unsealed step
        if which == 'best':
          raise ckpt_lib.CheckpointError(f'{e}{damaged_best}') from None
        print(checkpointer.report_damaged(step, e.reason, set_aside=False), flush=True)
        step = checkpointer.newest_intact_step(which, below=step)
        if step is None:
          raise ckpt_lib.CheckpointError(f'no intact checkpoint in {directory}') from None
  finally:
    checkpointer.close()
  return InferenceModel(config, model, variables, sharding, mesh, dtype, int(step), which)
