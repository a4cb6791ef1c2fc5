"""The one list of every configuration knob, with its default, and what follows from knobs alone.

Experiment files in `configs/` start from a task's recipe (`tasks.task_config`, itself
`base_config()` plus the task's changes), so every key that exists is listed here once, and a
misspelt key fails loudly (`check_knobs`, asked by the one validator, dca_jax/checks.py).
Names follow the PyTorch DCAL code users come from (`batch_size`,
`gradient_accumulation_steps`, `use_gradient_checkpointing`, `input_size`, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Optional

import ml_collections

from dca_jax import backbones
from dca_jax.errors import ConfigError  # noqa: F401  (config_lib.ConfigError: the knobs' error)

BACKBONES = backbones.names()  # dca_jax/backbones/: one file per family
OVERRIDABLE_BACKBONE_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size',
                               'resnet_width', 'resnet_layers')


INF = float('inf')


@dataclasses.dataclass(frozen=True)
class Knob:
  """One configuration knob, declared once: its default, its doc (the README's knob table) and
  what values it takes (`choices`, or `within` = (low, high, low allowed); high is allowed)."""
  name: str
  default: Any                     # a value, or a function making a fresh one (ConfigDicts)
  doc: str
  section: str                     # data | reid | model | optim | eval
  choices: Optional[tuple] = None
  within: Optional[tuple] = None

  def value(self):
    return self.default() if callable(self.default) else self.default


def _data_knobs(k) -> None:
  """Data."""
  k('task', 'fgvc', 'fgvc (top-1) | reid (mAP/CMC retrieval; docs/REID.md): a module of dca_jax/tasks/')
  k('dataset', 'synthetic', 'fgvc: cub | cars | aircraft | nabirds | dogs | pets | imagefolder (your own train/<class>/, test/<class>/) | synthetic; reid: market1501 | dukemtmc | msmt17 | veri776 | reid_folder (your own identity folders: docs/REID_DATA.md) | synthetic_reid')
  k('val_split', 0.0, "fraction held out of train as a validation split (fixed draw, whatever the seed); `best` is then chosen on it. FGVC: of each class's train images; Re-ID: of the train identities (their images: a val query/gallery; num_classes = the rest)", within=(0.0, 0.9, True))
  k('data_source', 'synthetic', 'tfds | folder | synthetic', choices=('tfds', 'folder', 'synthetic'))
  k('data_dir', '', 'TFDS data_dir, or the folder holding the official layout')
  k('num_classes', 10, 'classes of the dataset (200 CUB, 196 Cars, 100 Aircraft, 555 NABirds, 120 Dogs, 37 Pets; Re-ID: train identities); 0 = as many as the data has (a run records the count; the synthetic sets generate this many, 0: 10)', within=(0, INF, True))
  k('input_size', 448, 'crop height in px (and width unless input_width is set)', within=(1, INF, True))
  k('input_width', lambda: ml_collections.config_dict.placeholder(int), 'crop width in px; unset = input_size (square). Re-ID persons: 256 x 128', within=(1, INF, True))
  k('resize_size', 550, 'FGVC: resize before the crop (square)', within=(1, INF, True))
  k('test_crop', 'center_crop', 'center_crop (resize 550 -> centre 448) | resize (to 448)', choices=('center_crop', 'resize'))
  k('train_interpolation', 'bilinear', "train resize: bilinear (FGVC) / bicubic (Re-ID: TransReID's); eval resizes are bilinear", choices=('bilinear', 'bicubic'))
  k('normalization', 'auto', "auto (the backbone's, dca_jax/backbones/) / imagenet (mean/std: DeiT, DINOv2) / inception ([-1, 1]: Google ViT, AugReg) / clip (CLIP's mean/std)", choices=('auto',) + backbones.NORMALIZATIONS)
  k('shuffle_buffer', 2048, 'TFDS source: per-host shuffle buffer (folder/synthetic permute whole epochs)', within=(1, INF, True))
  k('num_parallel_calls', -1, 'tf.data AUTOTUNE', within=(-1, INF, True))
  k('verify_images', True, 'folder source: decode every file once at start, skip bad ones')
  k('synthetic_num_train', 1000, 'synthetic source only', within=(1, INF, True))
  k('synthetic_num_test', 500, 'synthetic source only', within=(1, INF, True))
  k('synthetic_image_size', 64, 'synthetic source only: generated image side in px', within=(8, INF, True))
  k('synthetic_seed', 0, 'synthetic sets: the generation seed (fixed data whatever `seed` trains with)', within=(0, INF, True))
  k('synthetic_distractors', 3, 'synthetic (FGVC) only: look-alike squares per image', within=(0, INF, True))
  k('synthetic_detail_size', 0.125, 'synthetic (FGVC) only: side of the class-defining detail / image side', within=(0.0, 0.5, False))


def _reid_input_knobs(k) -> None:
  """Re-ID input (task=reid)."""
  k('num_instances', 4, 'K images per identity in a batch; batch_size = P x K (paper 16 x 4)', within=(1, INF, True))
  k('crop_padding', 10, 'pad by this many px, then random crop back to the input size', within=(0, INF, True))
  k('random_erasing', 0.5, 'probability of random erasing per train image; 0 = off', within=(0.0, 1.0, True))
  k('random_erasing_fill', 'random', 'random (values N(0, 1) once normalised, TransReID) / mean (the mean colour)', choices=('random', 'mean'))
  k('random_erasing_max_area', 1 / 3, "largest erased fraction of the image (TransReID's timm RandomErasing: 1/3; Zhong et al.: 0.4); the smallest is 0.02", within=(0.02, 1.0, False))


def _model_knobs(k) -> None:
  """Model."""
  k('backbone', 'deit_tiny', "deit_tiny / deit_small / deit_base / vit_base / r50_vit_base (the paper's); dinov2_small / dinov2_base (+ _reg4) / clip_base / clip_base_quickgelu (dca_jax/backbones/)", choices=BACKBONES)
  k('backbone_overrides', lambda: ml_collections.ConfigDict(
      {k: ml_collections.config_dict.placeholder(tuple if k == 'resnet_layers' else int)
       for k in OVERRIDABLE_BACKBONE_FIELDS}), "width, depth, num_heads, mlp_dim, patch_size, resnet_width, resnet_layers (a conv stem: ResNet-v2 stage depths, e.g. '(1,)': the patch then cuts the stem's 4 x 2^(stages-1) smaller map): e.g. --config.backbone_overrides.depth=2")
  k('num_sa_layers', 12, 'L (must equal the backbone depth)', within=(1, INF, True))
  k('num_glca_layers', 1, 'M; 0 disables GLCA', within=(0, 1, True))
  k('num_pwca_layers', 12, 'T; 0 disables PWCA; T < L uses the last T blocks', within=(0, INF, True))
  k('top_k_ratio', 0.1, 'R: 0.1 FGVC, 0.3 Re-ID', within=(0.0, 1.0, False))
  k('glca_input', 'parallel', 'parallel: input of SA block L | on_top: output of SA block L', choices=('parallel', 'on_top'))
  k('glca_pool', 'cls', 'GLCA head reads: cls (its CLS output) / mean (of CLS + the R local outputs) / local (mean of the R local outputs)', choices=('cls', 'mean', 'local'))
  k('glca_select', 'rollout', "GLCA's local queries: rollout (paper) / random patches / last_layer (attention of the last block before GLCA only) / rollout_lowest (the R lowest: a control)", choices=('rollout', 'random', 'last_layer', 'rollout_lowest'))
  k('rollout_layers', 'before_glca', 'SA blocks the rollout accumulates: before_glca (1..L-1 with parallel GLCA) / all (1..L)', choices=('before_glca', 'all'))
  k('rollout_impl', 'vector', 'vector: CLS row as e0^T S_K ... S_1, O(L N^2) / running_product: one N x N map, O(L N^3), less memory', choices=('vector', 'running_product'))
  k('pwca_partners', 'per_device', "PWCA partners drawn within each device's share (no key/value traffic) / global (over the whole batch)", choices=('per_device', 'global'))
  k('pwca_partner_stop_gradient', False, "PWCA: no gradient flows into the partner's SA keys/values (the paper is silent)")
  k('glca_init_from_sa', True, 'copy the last SA block into GLCA when pretrained weights load')
  k('loss_weighting', 'uncertainty', 'uncertainty (Kendall et al.) | sum', choices=('uncertainty', 'sum'))
  k('loss_terms', '', "each branch's loss: the sum of these terms, comma-separated (losses.TERMS: ce, triplet); '' = the task's (FGVC ce; Re-ID ce,triplet)")
  k('loss_weights_init', 0.0, 'initial w_b of the uncertainty loss (paper: 0)', within=(-INF, INF, True))
  k('loss_weights_lr_multiplier', 1.0, 'the w_b learn at learning rate x this', within=(0.0, INF, True))
  k('label_smoothing', 0.0, 'cross-entropy label smoothing (paper: none)', within=(0.0, 0.999, True))
  k('classifier_init_std', 0.02, "std of the classifiers' normal init: 0.02 timm (FGVC), 0.001 TransReID (Re-ID)", within=(0.0, INF, True))
  k('triplet_margin', 0.0, 'task=reid: 0 = soft-margin batch-hard triplet, > 0 = hinge with this margin', within=(0.0, INF, True))
  k('triplet_feature', 'raw', 'task=reid: triplet distances of raw features (TransReID) / batch_standardized (collapse-proof from scratch: docs/REID.md)', choices=('raw', 'batch_standardized'))
  k('bnneck', False, "task=reid: BatchNorm neck between each branch's feature and its classifier (the Re-ID recipe's; FGVC has none)")
  k('stochastic_depth_prob', 0.1, 'drop-path rate of the last block (linear from 0)', within=(0.0, 0.999, True))
  k('attention_impl', 'xla', 'xla | cudnn (fused attention in SA/PWCA blocks whose attention maps are not needed)', choices=('xla', 'cudnn'))
  k('use_gradient_checkpointing', True, 'nn.remat around every block (SA/PWCA/GLCA)')
  k('remat_policy', 'nothing_saveable', 'full, nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable, ...')
  k('precision', 'auto', 'fp32 | bf16 | fp16 | auto (fp32 on CPU, bf16 on GPU/TPU)', choices=('auto', 'fp32', 'bf16', 'fp16'))
  k('pretrained_model', '', "a file (.npz / .safetensors / .pth), a dca_jax run's workdir (its backbone + GLCA, not its heads), a Hub id (timm/deit_tiny_patch16_224.fb_in1k: fetched once, cached) or a known name (tools/fetch_weights.py --list); none or '' = random init. FGVC/Re-ID configs: the paper's for the backbone")
  k('posemb_interpolation', 'bicubic', 'bicubic (timm) | bilinear (original ViT code)', choices=('bicubic', 'bilinear'))


def _optimisation_knobs(k) -> None:
  """Optimisation."""
  k('optimizer', 'adamw', 'adamw (FGVC) | sgd (Re-ID: momentum, coupled L2 weight decay)', choices=('adamw', 'sgd'))
  k('momentum', 0.9, 'sgd only', within=(0.0, 0.999, True))
  k('batch_size', 4, 'physical batch, global across devices', within=(1, INF, True))
  k('fsdp', False, 'shard params and optimizer state over the devices (else replicated)')
  k('gradient_accumulation_steps', 4, 'micro-batches per update (optax.MultiSteps); effective batch = batch_size x this', within=(1, INF, True))
  k('auto_batch', False, 'train: the memory planner picks batch_size x accumulation (same effective batch) and remat at start-up (docs/MEMORY.md)')
  k('plan_memory_margin', 0.1, 'plan/auto_batch: fraction of the usable device memory kept free (cuDNN workspace, fragmentation)', within=(0.0, 0.9, True))
  k('plan_memory_gb', 0.0, "plan/auto_batch: device memory to plan for in GiB; 0 = the device's (JAX's pool: XLA_PYTHON_CLIENT_MEM_FRACTION of it)", within=(0.0, INF, True))
  k('plan_mfu', 0.4, "plan: utilisation of the executed FLOPs (remat's included) assumed when turning FLOPs into step time", within=(0.0, 1.0, False))
  k('plan_search', False, 'plan: compile candidates in order of preference and stop at the first that fits (what auto_batch does) instead of all')
  k('learning_rate', 5e-4, 'base; scaled by effective batch / lr_reference_batch', within=(0.0, INF, False))
  k('lr_reference_batch', 512, 'the effective batch at which learning_rate applies as is', within=(1, INF, True))
  k('weight_decay', 0.05, 'AdamW decoupled decay; not on biases, norms, pos_embed, cls_token, loss weights', within=(0.0, INF, True))
  k('warmup_epochs', 1.0, 'linear warm-up, then cosine decay', within=(0.0, INF, True))
  k('warmup_factor', 0.0, 'warm-up starts from this x the peak lr (TransReID: 0.01)', within=(0.0, 1.0, True))
  k('min_lr_factor', 0.0, 'the cosine ends at this x the peak lr (TransReID: 0.002)', within=(0.0, 1.0, True))
  k('warmup_prefix', True, 'the cosine starts at the peak after the warm-up; False: it spans the whole run, the warm-up overriding its start (timm without warmup_prefix: TransReID)')
  k('num_epochs', 100, 'training length', within=(0.0, INF, False))
  k('max_grad_norm', 0.0, '0 disables global-norm clipping', within=(0.0, INF, True))
  k('seed', 42, 'init, data order, augmentation, PWCA partners, drop path (not the synthetic data: synthetic_seed)', within=(0, INF, True))


def _evaluation_knobs(k) -> None:
  """Evaluation, checkpoints, logging."""
  k('eval_batch_size', 16, 'global; the last batch is padded and masked', within=(1, INF, True))
  k('eval_frequency', 1, 'epochs', within=(1, INF, True))
  k('evals', lambda: ml_collections.ConfigDict(), "evaluators by name: {name: {type: classification / retrieval / attention, prefix, options}}; empty = the task's (dca_jax/evaluators/)")
  k('best_metric', '', "the eval metric the best checkpoint is chosen by; '' = the task's (accuracy / mAP), on the validation split when val_split > 0")
  k('test_flip', False, 'FGVC: also score the probabilities averaged over each test image and its mirror (flip/accuracy beside the single-crop accuracy)')
  k('reid_feature', 'before_bn', 'task=reid: retrieval feature concat(SA, GLCA) taken before_bn / after_bn (the neck)', choices=('before_bn', 'after_bn'))
  k('reid_normalize', True, 'task=reid: L2-normalise the retrieval feature')
  k('reid_flip_test', False, 'task=reid: average the features of the image and its mirror')
  k('reid_rerank', False, 'task=reid: k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3)')
  k('save_frequency', 1, 'epochs', within=(1, INF, True))
  k('save_every_steps', 0, 'optimizer micro-steps; 0 = off (tests and pre-emptible jobs)', within=(0, INF, True))
  k('keep_checkpoints', 2, 'latest N kept, plus the best by best_metric', within=(1, INF, True))
  k('log_every_steps', 10, 'metrics to TensorBoard / metrics.jsonl / progress bar', within=(1, INF, True))
  k('wandb_project', '', 'log to Weights & Biases when set (pip install wandb)')
  k('max_steps', 0, 'stop after this many micro-steps; 0 = run num_epochs', within=(0, INF, True))


# The sections, in the README's order. A knob is one `k(...)` line in its section's function.
SECTIONS = (('data', _data_knobs), ('reid', _reid_input_knobs), ('model', _model_knobs),
            ('optim', _optimisation_knobs), ('eval', _evaluation_knobs))


def _declare() -> dict[str, Knob]:
  knobs: dict[str, Knob] = {}
  for section, declare in SECTIONS:
    def k(name, default, doc, *, choices=None, within=None, section=section):
      assert name not in knobs, f'knob {name} declared twice'
      knobs[name] = Knob(name, default, doc, section, choices, within)
    declare(k)
  return knobs


KNOBS = _declare()
# Every choice knob's values and every numeric knob's range (the data package and the model
# read them from here).
CHOICES = {name: knob.choices for name, knob in KNOBS.items() if knob.choices is not None}
RANGES = {name: knob.within for name, knob in KNOBS.items() if knob.within is not None}


def base_config() -> ml_collections.ConfigDict:
  """Every knob at its default (FGVC on the synthetic set): the README's knob table."""
  c = ml_collections.ConfigDict()
  for knob in KNOBS.values():
    c[knob.name] = knob.value()
  return c


def _json_value(key: str, default, value):
  """`value` (read from JSON) in the type of the knob's `default`: lists back to tuples where
  the knob holds a tuple, nested dicts into the ConfigDict a knob holds."""
  if isinstance(default, ml_collections.ConfigDict):
    if not isinstance(value, dict):
      raise ConfigError(f'config.{key} in the JSON is {value!r}, not a mapping')
    merged = copy.deepcopy(default)
    fixed = bool(merged.keys())  # backbone_overrides: known fields only; evals: any names
    for name, item in value.items():
      if fixed and name not in merged:
        raise ConfigError(f'unknown config key {key}.{name} in the JSON config')
      if fixed:
        field = merged._fields[name]  # pylint: disable=protected-access
        if isinstance(item, list):
          item = tuple(item)
        if item is None:
          continue  # an unset placeholder stays unset
        field_type = getattr(field, 'field_type', None)
        _set_typed(merged, name, field_type(item) if field_type is tuple else item, key)
      else:
        merged[name] = item
    return merged
  if isinstance(default, tuple) and isinstance(value, list):
    return tuple(value)
  return value


def from_json(values: dict) -> ml_collections.ConfigDict:
  """A config from its JSON form (a run's WORKDIR/config.json): every knob at its default, then
  the file's values in the knobs' types. Raises ConfigError naming an unknown key."""
  if not isinstance(values, dict):
    raise ConfigError('a JSON config is an object of knobs, e.g. a run\'s WORKDIR/config.json')
  c = base_config()
  unknown = sorted(set(values) - set(c.keys()))
  if unknown:
    raise ConfigError(f'unknown config key(s) in the JSON config: {", ".join(unknown)}')
  for key, value in values.items():
    default = c[key]
    if value is None and key in RANGES:  # a placeholder knob left unset (input_width)
      continue
    _set_typed(c, key, _json_value(key, default, value))
  return c


def _set_typed(config, key: str, value, parent: str = '') -> None:
  """config[key] = value; ConfigError naming the knob where ConfigDict's typed field refuses it
  ("four" for an int, 1 for a bool)."""
  try:
    config[key] = value
  except TypeError:
    name = f'{parent}.{key}' if parent else key
    raise ConfigError(f'config.{name}={value!r} in the JSON config is not of type '
                      f'{config.get_ref(key).get_type().__name__}') from None


def load_json(path: str) -> ml_collections.ConfigDict:
  """`from_json` of a file; ConfigError (one line naming the file) if it cannot be one."""
  try:
    with open(path) as f:
      values = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f'--config {path}: no such file') from None
  except (OSError, ValueError) as e:
    raise ConfigError(f'--config {path}: not a JSON config ({type(e).__name__}: '
                      f'{" ".join(str(e).split())})') from None
  try:
    return from_json(values)
  except ConfigError as e:
    raise ConfigError(f'--config {path}: {e}') from None


REMAT_POLICIES = ('nothing_saveable', 'everything_saveable', 'dots_saveable', 'checkpoint_dots',
                  'dots_with_no_batch_dims_saveable', 'checkpoint_dots_with_no_batch_dims')


def remat_policy_names() -> list[str]:
  """The `jax.checkpoint_policies` usable by name (factories such as save_only_these_names need
  arguments) that this jax has."""
  import jax  # pylint: disable=g-import-not-at-top
  return [n for n in REMAT_POLICIES if hasattr(jax.checkpoint_policies, n)]


def _check_range(key: str, value) -> None:
  if value is None and key == 'input_width':
    return  # unset: square
  low, high, low_allowed = RANGES[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f'config.{key}={value!r} must be a number')
  if not (value > low or (low_allowed and value == low)) or value > high:
    bounds = ('[' if low_allowed else '(') + f'{low}, {high}]'
    raise ConfigError(f'config.{key}={value} is out of its range {bounds}')


def _check_backbone_overrides(config) -> None:
  unknown = set(config.backbone_overrides.keys()) - set(OVERRIDABLE_BACKBONE_FIELDS)
  if unknown:
    raise ConfigError(f'unknown backbone_overrides {sorted(unknown)}; '
                      f'known: {", ".join(OVERRIDABLE_BACKBONE_FIELDS)}')
  for key, value in backbone_overrides(config).items():
    if key == 'resnet_layers':
      if not value or not all(isinstance(v, int) and v >= 1 for v in value):
        raise ConfigError(f'config.backbone_overrides.resnet_layers={tuple(value)!r} must be '
                          "stage depths >= 1, e.g. '(1,)'")
    elif value < 1:
      raise ConfigError(f'config.backbone_overrides.{key}={value} must be >= 1')


def check_knobs(config: ml_collections.ConfigDict) -> None:
  """What the knobs' declarations say, one knob at a time: raises ConfigError (a ValueError)
  with one line naming the first unknown key, unknown choice or value out of range. The checks
  that involve the task, the evaluators, the weights or the loss terms are theirs
  (dca_jax/checks.py asks each)."""
  check_declared(config)
  policy = config.remat_policy
  if policy != 'full' and policy not in remat_policy_names():
    raise ConfigError(f'config.remat_policy={policy!r} is not \'full\' or a policy in '
                      f'jax.checkpoint_policies: {", ".join(remat_policy_names())}')


def check_declared(config: ml_collections.ConfigDict) -> None:
  """`check_knobs` less the remat policy (which asks jax): no jax or numpy is imported, so it
  can run before the malloc tuning that must precede them (config_files.prepare)."""
  known = base_config()
  unknown = sorted(set(config.keys()) - set(known.keys()))
  if unknown:
    raise ConfigError(f'unknown config key(s): {", ".join(unknown)}; '
                      f'known keys are listed in dca_jax/config_lib.py')
  for key, allowed in CHOICES.items():
    if config[key] not in allowed:
      raise ConfigError(f'config.{key}={config[key]!r} is not one of {allowed}')
  for key in RANGES:
    _check_range(key, config[key])
  _check_backbone_overrides(config)
  if not isinstance(config.pretrained_model, str):
    raise ConfigError(f'config.pretrained_model={config.pretrained_model!r} must be a path, a '
                      "Hub id or a name ('none' trains from scratch)")


# The knobs that describe a trained model, in one place: the checkpoint's meta records them, and
# the visualize mode restores a compared run with them. SHAPE keys fix the saved parameter
# shapes (a checkpoint must agree to be restored); BEHAVIOUR keys change what the same
# parameters compute (a difference is warned about).
MODEL_SHAPE_KEYS = ('task', 'backbone', 'backbone_overrides', 'num_classes', 'input_size',
                    'input_width', 'num_sa_layers', 'num_glca_layers', 'bnneck')
MODEL_BEHAVIOUR_KEYS = ('num_pwca_layers', 'top_k_ratio', 'glca_input', 'glca_pool',
                        'glca_select', 'rollout_layers')


def model_settings(config) -> dict:
  """The model-describing knobs of `config` as plain JSON values (MODEL_*_KEYS)."""
  settings = {k: config[k] for k in MODEL_SHAPE_KEYS + MODEL_BEHAVIOUR_KEYS}
  settings['backbone_overrides'] = backbone_overrides(config)
  settings['input_width'] = input_hw(config)[1]
  settings['bnneck'] = bool(config.bnneck)  # resolved by the task (dca_jax/checks.py)
  return settings


def activation_elements(config) -> int:
  """batch x tokens x width x depth of one physical batch: the size of a train step's
  activations, roughly (host_malloc reads it before jax loads, so no model is built)."""
  arch = {**backbones.get(config.backbone).arch,
          **{k: v for k, v in config.backbone_overrides.items() if v is not None}}
  patch = arch.get('patch_size', 16)
  patch = 16 if patch == 1 else patch   # the hybrid's patches are its ResNet stem's 16 px cells
  tokens = (config.input_size // patch) ** 2 + 1
  return config.batch_size * tokens * arch['width'] * arch['depth']


def resolve_normalization(config) -> str:
  """'auto': the backbone's (its registry entry, dca_jax/backbones/): [-1, 1] for the
  Google-trained backbones (ViT-B/16 in21k / AugReg and R50+ViT-B/16), ImageNet mean/std for
  DeiT and DINOv2, CLIP's for CLIP. An explicit choice is kept."""
  if config.normalization != 'auto':
    return config.normalization
  return backbones.normalization(config.backbone)


def backbone_overrides(config) -> dict:
  """The backbone fields this config sets (unset placeholders dropped)."""
  return {k: list(v) if isinstance(v, (tuple, list)) else v  # lists: as the meta's JSON
          for k, v in config.backbone_overrides.items() if v is not None}


def input_hw(config) -> tuple[int, int]:
  """(height, width) of the network input: input_size x input_width (square when unset)."""
  width = config.input_width if config.input_width is not None else config.input_size
  return int(config.input_size), int(width)


def total_steps(config, steps_per_epoch: int) -> int:
  """Micro-steps of the whole run: max_steps when set, else num_epochs of the data."""
  return int(config.max_steps or int(config.num_epochs * steps_per_epoch))


def effective_batch_size(config) -> int:
  return config.batch_size * config.gradient_accumulation_steps


def scaled_learning_rate(config) -> float:
  """Paper: lr = 5e-4 / 512 x effective batch (FGVC); Re-ID: 0.008 at batch 64."""
  return config.learning_rate * effective_batch_size(config) / config.lr_reference_batch
