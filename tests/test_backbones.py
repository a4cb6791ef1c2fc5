"""The backbone registry (dca_jax/backbones/) and the families beyond the paper's: DINOv2 (layer
scale, patch 14, registers) and CLIP (pre-norm, QuickGELU), each against timm on tiny random
fixtures through our importer (tests/fixtures/bb_*, made by tests/fixtures/make_backbones.py),
and what DCAL's rollout / GLCA selection do with register tokens.

The fixture configs come from the registry entries themselves (`get_variant(name, overrides)`
with only the sizes shrunk), so a wrong flag in a family file fails here.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax import backbones, checks, config_lib, hub, tasks
from dca_jax import weights as W
from dca_jax.models import dcal, vit

FIX = os.path.join(os.path.dirname(__file__), 'fixtures')
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
# fixture -> (registry variant, patch size, native px, (height, width) resized sizes)
FIXTURES = {
    'bb_dinov2': ('dinov2_small', 14, 56, [(84, 84), (84, 42)]),
    'bb_dinov2_reg': ('dinov2_small_reg4', 14, 56, [(84, 84), (84, 42)]),
    'bb_clip': ('clip_base', 8, 32, [(48, 48), (48, 24)]),
    'bb_clip_quickgelu': ('clip_base_quickgelu', 8, 32, [(48, 48), (48, 24)]),
}
PARITY_ATOL = 1e-5


def tiny_config(variant, patch):
  return vit.get_variant(variant, dict(TINY, patch_size=patch))


@pytest.fixture(scope='module')
def expected():
  with np.load(os.path.join(FIX, 'bb_expected.npz')) as f:
    return {k: f[k] for k in f.files}


def nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


_CACHE = {}


def model_params(model, height, width):
  """(jitted apply, shape-only params filled with 0.5): the loader fills every leaf."""
  key = (model, height, width)
  if key not in _CACHE:
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3)))
    params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes['params'])
    _CACHE[key] = (jax.jit(lambda p, x: model.apply({'params': p}, x)), params)
  return _CACHE[key]


def fixture_file(name):
  return os.path.join(FIX, ('bb_clip' if name.startswith('bb_clip') else name) + '.safetensors')


def expected_key(name, what, size):
  tag = 'quickgelu_' if name == 'bb_clip_quickgelu' else ''
  return f"{'bb_clip' if name.startswith('bb_clip') else name}_{tag}{what}_{size}"


def images(expected, height, width):
  return nhwc(expected[f'inputs_{height}'][:, :, :height, :width])


# --- parity with timm ---------------------------------------------------------------------------
@pytest.mark.parametrize('name', list(FIXTURES))
def test_logits_and_features_match_timm_at_the_native_size(expected, name):
  variant, patch, size, _ = FIXTURES[name]
  cfg = tiny_config(variant, patch)
  # DCAL: its SA branch is the backbone + `norm` + `head` (GLCA left as initialised).
  apply, params = model_params(dcal.DCAL(cfg, num_classes=10, num_pwca_layers=0), size, size)
  new, report = W.load_pretrained(fixture_file(name), params, cfg, load_head=True)
  assert not report.unused, report.summary()
  assert {n.split('/')[0] for n in report.newly_initialized} == {
      'glca_block', 'glca_norm', 'glca_head', 'loss_weights'}, report.summary()
  out = apply(new, images(expected, size, size))
  np.testing.assert_allclose(out['sa_logits'], expected[expected_key(name, 'logits', size)],
                             atol=PARITY_ATOL, rtol=0)
  np.testing.assert_allclose(out['sa_feature'], expected[expected_key(name, 'features', size)],
                             atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize('name', list(FIXTURES))
def test_logits_match_timm_with_resized_position_embeddings(expected, name):
  variant, patch, size, sizes = FIXTURES[name]
  cfg = tiny_config(variant, patch)
  for height, width in sizes:
    apply, params = model_params(vit.VisionTransformer(cfg, num_classes=10), height, width)
    grid = (height // patch, width // patch)
    new, report = W.load_pretrained(fixture_file(name), params, cfg, load_head=True,
                                    grid_hw=grid)
    assert not report.unused and not report.newly_initialized, report.summary()
    assert any(f'4x4 -> {grid[0]}x{grid[1]} (bicubic)' in n for n in report.notes), report.notes
    logits = apply(new, images(expected, height, width))
    np.testing.assert_allclose(logits, expected[expected_key(name, 'logits', f'{height}x{width}')],
                               atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize('name,native,variant,patch', [
    ('bb_dinov2_reg', 'bb_dinov2_reg_meta', 'dinov2_small_reg4', 14),
    ('bb_clip', 'bb_clip_openai', 'clip_base', 8)])
def test_native_layouts_load_as_timm_does(expected, name, native, variant, patch):
  """Meta's DINOv2 and OpenAI's CLIP state dicts through the families' checkpoint filters."""
  cfg = tiny_config(variant, patch)
  size = FIXTURES[name][2]
  apply, params = model_params(vit.VisionTransformer(cfg, num_classes=10), size, size)
  new, report = W.load_pretrained(os.path.join(FIX, native + '.safetensors'), params, cfg,
                                  load_head=True)
  assert not report.newly_initialized and not report.unused, report.summary()
  assert any('native checkpoint layout' in n for n in report.notes), report.notes
  np.testing.assert_allclose(apply(new, images(expected, size, size)),
                             expected[f'{name}_logits_{size}'], atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize('name,variant,patch,feature', [
    ('bb_dinov2', 'deit_small', 14, 'layer scale'),
    ('bb_dinov2_reg', 'dinov2_small', 14, 'register tokens'),
    ('bb_clip', 'deit_small', 8, 'pre-norm'),
])
def test_weights_of_another_network_are_refused(name, variant, patch, feature):
  """A checkpoint feature the configured backbone has switched off would load into a different
  network: refused (strict) in one line, before any shape error could hide why; strict=False
  loads around a layer scale or a pre-norm and lists it unused (a register checkpoint's
  position table has no CLS slot: no way around that)."""
  cfg = tiny_config(variant, patch)
  size = FIXTURES[name][2]
  _, params = model_params(vit.VisionTransformer(cfg, num_classes=10), size, size)
  if name == 'bb_clip':  # CLIP has no patch bias and eps 1e-5: only the pre-norm differs here
    cfg = vit.get_variant(variant, dict(TINY, patch_size=patch))
  with pytest.raises(W.WeightLoadError, match=feature) as error:
    W.load_pretrained(fixture_file(name), params, cfg)
  assert '\n' not in str(error.value)
  if name != 'bb_dinov2_reg':
    _, report = W.load_pretrained(fixture_file(name), params, cfg, strict=False)
    assert any(('ls1.gamma' if name == 'bb_dinov2' else 'norm_pre') in u for u in report.unused)


def test_a_layer_scale_model_needs_the_gammas(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = W.read_checkpoint(fixture_file('bb_dinov2'))
  del state['blocks.1.ls2.gamma']
  path = str(tmp_path / 'no_gamma.safetensors')
  save_file(state, path)
  cfg = tiny_config('dinov2_small', 14)
  _, params = model_params(vit.VisionTransformer(cfg, num_classes=10), 56, 56)
  with pytest.raises(W.WeightLoadError, match=r'lacks 1 parameter.*block_1/ls2/gamma'):
    W.load_pretrained(path, params, cfg)


def test_every_layer_norm_uses_the_backbone_eps():
  """CLIP's LayerNorms use eps 1e-5, timm's ViTs 1e-6: every norm of the backbone and of DCAL
  (blocks, norm_pre, norm, glca_norm) must take the config's (a 1e-6 / 1e-5 slip is below the
  parity tolerance, so it is checked here directly)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  cfg = tiny_config('clip_base', 8)
  seen = []

  def record(next_fun, args, kwargs, context):
    if (isinstance(context.module, (nn.LayerNorm, vit.LayerNorm))
        and context.method_name == '__call__'):
      seen.append((context.module.name, context.module.epsilon))
    return next_fun(*args, **kwargs)

  x = jnp.zeros((1, 32, 32, 3))
  for model in (vit.VisionTransformer(cfg, num_classes=3),
                dcal.DCAL(cfg, num_classes=3, num_pwca_layers=0, glca_pool='mean')):
    seen.clear()
    with nn.intercept_methods(record):
      jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    names = {name for name, _ in seen}
    assert {'norm_pre', 'norm1', 'norm2', 'norm'} <= names, names
    assert all(eps == 1e-5 for _, eps in seen), seen
  assert 'glca_norm' in names


# --- the registry -------------------------------------------------------------------------------
def test_every_registered_variant_builds_and_names_its_preprocessing():
  for name, variant in backbones.VARIANTS.items():
    cfg = vit.get_variant(name)
    assert vit.VARIANTS[name] == dict(variant.arch)
    assert variant.normalization in backbones.MEAN_STD and variant.family in backbones.FAMILIES
    assert cfg.grid_size(variant.pretrained_size) * cfg.stem_stride * cfg.patch_size == \
        variant.pretrained_size
    c = tasks.task_config('fgvc', name)
    assert config_lib.resolve_normalization(c) == variant.normalization
    if variant.weights != 'none':   # weights by name: the entry's weights fit the entry
      known = hub.KNOWN[variant.weights]
      assert known.backbone == name and known.normalization == variant.normalization
  assert vit.get_variant('dinov2_base_reg4').num_prefix_tokens == 5
  assert vit.get_variant('clip_base_quickgelu').activation == 'quick_gelu'
  with pytest.raises(ValueError, match="unknown backbone 'dinov3'"):
    vit.get_variant('dinov3')
  with pytest.raises(ValueError, match='register tokens need no_embed_class'):
    vit.ViTConfig(**TINY, num_registers=2)


def test_clip_normalization_round_trips():
  from dca_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  x = np.arange(256, dtype=np.uint8).reshape(1, -1, 1).repeat(3, -1)
  normalized = preprocess.normalize(x, 'clip')
  mean, std = backbones.MEAN_STD['clip']
  np.testing.assert_allclose(normalized[0, 0], -np.asarray(mean) / std, rtol=1e-6)
  np.testing.assert_array_equal(preprocess.denormalize(normalized, 'clip'), x)
  np.testing.assert_allclose(preprocess.device_normalize(x, 'clip'), normalized, atol=1e-6)


# --- register tokens in DCAL --------------------------------------------------------------------
def test_select_tokens_never_picks_a_register():
  # CLS, 3 registers scoring highest of all, then 6 patches.
  row = jnp.asarray([[0.0, 9.0, 8.0, 7.0, 0.1, 0.6, 0.3, 0.5, 0.2, 0.4]])
  index = dcal.select_tokens(row, 0.5, num_prefix_tokens=4)
  np.testing.assert_array_equal(index, [[0, 5, 7, 9]])   # the 3 best patches, in token numbers
  np.testing.assert_array_equal(dcal.patch_frame(index, 3, index=True), [[0, 2, 4, 6]])
  np.testing.assert_array_equal(dcal.patch_frame(row, 3, index=False),
                                row[:, jnp.asarray([0, 4, 5, 6, 7, 8, 9])])


def _np_forward(params, images, cfg, ratio):
  """A float64 numpy DCAL forward for a register backbone (no layer scale, exact GELU):
  [CLS, registers, patches + pos], rollout over all tokens, top-R over the patches only,
  GLCA on CLS + those patches, `local` pooling."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  erf = np.vectorize(math.erf)
  ln = lambda x, q: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
                     * q['scale'] + q['bias'])
  dense = lambda x, q: x @ q['kernel'] + q['bias']

  def block(q, x, index=None):
    b, n, d = x.shape
    qkv = dense(ln(x, q['norm1']), q['attn']['qkv']).reshape(b, n, 3, cfg.num_heads, -1)
    qq, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if index is not None:
      rows = np.arange(b)[:, None]
      qq, x = qq[rows, index], x[rows, index]
    logits = np.einsum('bqhd,bkhd->bhqk', qq, k) / math.sqrt(d // cfg.num_heads)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    x = x + dense(np.einsum('bhqk,bkhd->bqhd', w, v).reshape(b, qq.shape[1], d),
                  q['attn']['proj'])
    h = dense(ln(x, q['norm2']), q['mlp']['fc1'])
    return x + dense(0.5 * h * (1 + erf(h / math.sqrt(2))), q['mlp']['fc2']), w.mean(1)

  e, patch = p['embed'], cfg.patch_size
  b, hh, ww, c = images.shape
  t = images.reshape(b, hh // patch, patch, ww // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  kern = e['patch_embed']['kernel']
  x = (t.reshape(b, -1, patch * patch * c) @ kern.reshape(-1, kern.shape[-1])
       + e['patch_embed']['bias'])
  x = np.concatenate([np.broadcast_to(e['cls_token'], (b, 1, cfg.width)),
                      np.broadcast_to(e['reg_token'], (b, cfg.num_registers, cfg.width)),
                      x + e['pos_embed']], axis=1)
  maps = []
  for i in range(cfg.depth):
    glca_in = x
    x, m = block(p[f'block_{i}'], x)
    maps.append(m)
  n = x.shape[1]
  acc = np.broadcast_to(np.eye(n), (b, n, n))
  for s in maps[:-1]:  # the blocks before GLCA
    s = 0.5 * s + 0.5 * np.eye(n)
    acc = np.einsum('bij,bjk->bik', s / s.sum(-1, keepdims=True), acc)
  row = acc[:, 0]
  prefix = 1 + cfg.num_registers
  r = int(round(ratio * (n - prefix)))
  top = np.argsort(-row[:, prefix:], axis=1, kind='stable')[:, :r] + prefix
  index = np.concatenate([np.zeros((b, 1), int), top], 1)
  g, _ = block(p['glca_block'], glca_in, index)
  g = ln(g, p['glca_norm'])[:, 1:].mean(1)
  return {'row': row, 'index': index, 'glca_logits': g @ p['glca_head']['kernel']
          + p['glca_head']['bias']}


def test_dcal_rollout_and_selection_with_registers_match_numpy():
  """Registers take part in attention (keys, values, the rollout's products) but are no
  patches: GLCA's top R ranks the patches only, and the outputs `rollout` / `glca_index` are in
  the [CLS, patches] frame the visualizer draws (register columns dropped)."""
  cfg = vit.ViTConfig(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=8,
                      num_registers=3, no_embed_class=True)
  model = dcal.DCAL(cfg, num_classes=5, num_pwca_layers=0, top_k_ratio=0.25, glca_pool='local')
  x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
  # Random parameters without an init compile: N(0, 0.3), norm scales around 1; registers
  # that draw attention (with these, a top R over every non-CLS token would pick some).
  rng = np.random.default_rng(2)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (float(path[-1].key == 'scale') + 0.3 * rng.standard_normal(s.shape)
                       ).astype(np.float32), shapes)
  params['embed']['reg_token'] = 3.0 * rng.standard_normal((1, 3, 32)).astype(np.float32)
  out = jax.jit(model.apply)({'params': params}, x)
  ref = _np_forward(params, np.asarray(x, np.float64), cfg, 0.25)
  registers = ref['row'][:, 1:4]
  kth_patch = -np.sort(-ref['row'][:, 4:], axis=1)[:, 3:4]
  assert (registers > kth_patch).any(), 'the test needs registers that would out-rank patches'
  np.testing.assert_allclose(out['rollout'], np.concatenate([ref['row'][:, :1], ref['row'][:, 4:]],
                                                            axis=1), atol=1e-5)
  assert out['rollout'].shape == (2, 1 + 16)
  np.testing.assert_array_equal(out['glca_index'], np.where(ref['index'] > 0, ref['index'] - 3, 0))
  assert out['glca_index'].min() >= 0 and out['glca_index'].max() <= 16
  np.testing.assert_allclose(out['glca_logits'], ref['glca_logits'], atol=1e-4)


# --- a config with a new backbone: train, evaluate, visualise -----------------------------------
def _cub_config(arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'cub_config', os.path.join(os.path.dirname(FIX), '..', 'configs', 'cub.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('arg', ['dinov2_base', 'dinov2_small_reg4', 'clip_base',
                                 'clip_base_quickgelu'])
def test_cub_config_picks_the_backbone_its_weights_and_normalisation(arg):
  config = _cub_config(arg)
  checks.checked(config)
  variant = backbones.get(arg)
  assert config.backbone == arg and config.pretrained_model == variant.weights
  assert hub.parse(config.pretrained_model).known.backbone == arg
  assert config_lib.resolve_normalization(config) == variant.normalization
  cfg = vit.get_variant(arg)
  assert cfg.grid_size(config.input_size) == config.input_size // cfg.patch_size  # 448 fits


@pytest.mark.slow  # train, evaluate and visualise end to end
def test_dinov2_reg4_config_trains_evaluates_and_visualises(tmp_path, monkeypatch, capsys):
  """configs/cub.py:dinov2_small_reg4 shrunk (the fixture's sizes, synthetic data, 56 px): the
  timm fixture loads as its pretrained weights, 2 steps train (SA + GLCA + PWCA), the epoch's
  evaluation scores them, and the visualize mode restores the checkpoint and draws the rollout
  and GLCA's cells on the 4 x 4 patches (registers dropped)."""
  import json  # pylint: disable=g-import-not-at-top

  from dca_jax import train, visualize  # pylint: disable=g-import-not-at-top
  config = _cub_config('dinov2_small_reg4')
  config.dataset = config.data_source = 'synthetic'
  config.num_classes = 4
  config.synthetic_num_train, config.synthetic_num_test, config.synthetic_image_size = 8, 8, 56
  config.input_size, config.resize_size = 56, 60
  config.backbone_overrides.update(TINY)
  config.num_sa_layers, config.num_pwca_layers, config.top_k_ratio = 2, 1, 0.25
  config.batch_size, config.gradient_accumulation_steps, config.eval_batch_size = 4, 1, 8
  config.num_epochs, config.warmup_epochs = 1, 0.0
  config.use_gradient_checkpointing, config.precision = False, 'fp32'
  config.pretrained_model = fixture_file('bb_dinov2_reg')
  checks.checked(config)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  banner = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith('Pretrained weights:')]
  assert banner and banner[0].endswith(
      '35 arrays loaded, GLCA from block_1'), banner   # every backbone leaf, registers and gammas
  assert hub.banner_line(config.pretrained_model, None).endswith('not loaded (the resumed '
                                                                 'checkpoint holds the weights)')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert any('eval/accuracy' in r for r in records), records[-1]
  predictors = {}
  real = visualize.Predictor
  monkeypatch.setattr(visualize, 'Predictor', lambda *a: predictors.setdefault(a[1], real(*a)))
  written = visualize.run_visualize(config, workdir, num_images=1)
  assert len(written) == 1 and os.path.getsize(written[0]) > 0
  out = predictors[workdir](np.zeros((1, 56, 56, 3), np.uint8))
  assert out['rollout'].shape == (1, 1 + 16)          # CLS + 4 x 4 patches, no registers
  assert 1 <= out['glca_index'][:, 1:].min() and out['glca_index'].max() <= 16
