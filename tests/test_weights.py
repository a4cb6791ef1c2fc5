"""Pretrained-weight import: parity with timm on tiny fixtures, and refusal of bad inputs.

The fixtures in tests/fixtures/ come from `tests/fixtures/make_timm.py` (timm with random
weights): the same tiny ViT and R50-hybrid saved as timm `.safetensors`/`.pth` and as Google
`.npz` (checked there with timm's own npz loader), with timm's logits at 32 px (native), 64 px
and the non-square 64x32 and 48x24 px (timm built at `img_size=(H, W)`, position embedding resized
by timm's `checkpoint_filter_fn` from the 4x4 grid to 8x8, 8x4, 6x3). No torch import here: the
`.pth` files are read by weights.py's own torch.save reader (torch.load where torch is installed);
`tests/fixtures/make_torch.py` (torch only) wrote the legacy-format and tensor-layout fixtures.
"""

import copy
import importlib.util
import os
import pickle
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from dca_jax import train_step
from dca_jax import weights as W
from dca_jax.models import vit

FIX = os.path.join(os.path.dirname(__file__), 'fixtures')
HAS_TORCH = importlib.util.find_spec('torch') is not None

CONFIGS = {
    'vit': vit.ViTConfig(width=48, depth=2, num_heads=2, mlp_dim=192, patch_size=8),
    'hybrid': vit.ViTConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=1,
                            resnet_layers=(1, 1), resnet_width=32),
}
FORMATS = ['npz', 'safetensors', 'pth']


@pytest.fixture(scope='module')
def expected():
  with np.load(os.path.join(FIX, 'expected.npz')) as f:
    return {k: f[k] for k in f.files}


_MODELS = {}


def model_and_params(name, size, cfg=None, num_classes=10):
  """(jitted apply, freshly initialised params) for a fixture model at an image size (a side or
  (height, width))."""
  cfg = cfg or CONFIGS[name]
  height, width = (size, size) if isinstance(size, int) else size
  key = (cfg, height, width, num_classes)
  if key not in _MODELS:
    model = vit.VisionTransformer(cfg, num_classes=num_classes)
    # Shapes only (a real init costs seconds of eager op compiles on CPU); the loader fills
    # every leaf in the parity tests, the rest only look at names.
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3)))
    params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes['params'])
    _MODELS[key] = (jax.jit(lambda p, x: model.apply({'params': p}, x)), params)
  return _MODELS[key]


def nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def fixture_images(expected, height, width):
  """NHWC inputs timm saw: the 32 px set, or the top-left height x width of the 64 px set."""
  if (height, width) == (32, 32):
    return nhwc(expected['inputs_32'])
  return nhwc(expected['inputs_64'][:, :, :height, :width])


# (height, width) in px; both fixture models have stride 8 (patch 8 / the ResNet stem), so the
# 32 px checkpoints hold a 4x4 grid, resized to 8x8, 8x4 and 6x3 here.
SIZES = [(32, 32), (64, 64), (64, 32), (48, 24)]
STRIDE = 8


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('height,width', SIZES, ids=[f'{h}x{w}' for h, w in SIZES])
@pytest.mark.parametrize('name', ['vit', 'hybrid'])
def test_logits_match_timm(expected, name, height, width, fmt):
  apply, params = model_and_params(name, (height, width))
  grid_hw = None if height == width else (height // STRIDE, width // STRIDE)
  new, report = W.load_pretrained(os.path.join(FIX, f'{name}.{fmt}'), params, CONFIGS[name],
                                  load_head=True, grid_hw=grid_hw)
  assert not report.newly_initialized and not report.unused, report.summary()
  assert len(report.loaded) == len(jax.tree_util.tree_leaves(params))
  logits = np.asarray(apply(new, fixture_images(expected, height, width)))
  size = str(height) if height == width else f'{height}x{width}'
  np.testing.assert_allclose(logits, expected[f'{name}_logits_{size}'], atol=1e-4, rtol=0)
  if height != 32:
    resized = f'4x4 -> {height // STRIDE}x{width // STRIDE} (bicubic)'
    assert any(resized in note for note in report.notes), report.notes


def test_non_square_grid_without_grid_hw_refused():
  _, params = model_and_params('vit', (64, 32))
  with pytest.raises(W.WeightLoadError, match=r'pass grid_hw=\(height, width\)') as error:
    W.load_pretrained(os.path.join(FIX, 'vit.safetensors'), params, CONFIGS['vit'])
  assert 'embed/pos_embed' in str(error.value) and '\n' not in str(error.value)


def test_grid_hw_checked_against_the_model():
  _, params = model_and_params('vit', (64, 32))
  with pytest.raises(W.WeightLoadError, match=r'grid_hw=\(8, 8\) gives 64 patches.* holds 32'):
    W.load_pretrained(os.path.join(FIX, 'vit.safetensors'), params, CONFIGS['vit'],
                      grid_hw=(8, 8))
  with pytest.raises(ValueError, match='grid_hw must be'):
    W.load_pretrained(os.path.join(FIX, 'vit.safetensors'), params, CONFIGS['vit'], grid_hw=8)


def test_grid_hw_square_same_as_inferred():
  _, params = model_and_params('vit', 64)
  path = os.path.join(FIX, 'vit.npz')
  inferred, _ = W.load_pretrained(path, params, CONFIGS['vit'], posemb_interpolation='bilinear')
  given, report = W.load_pretrained(path, params, CONFIGS['vit'], posemb_interpolation='bilinear',
                                    grid_hw=(8, 8))
  np.testing.assert_array_equal(given['embed']['pos_embed'], inferred['embed']['pos_embed'])
  assert any('4x4 -> 8x8 (bilinear)' in note for note in report.notes)


def test_non_square_checkpoint_at_the_model_grid_loaded_as_is(tmp_path):
  # E.g. a Re-ID checkpoint trained at 16x8: same grid, nothing to resize (with or without
  # grid_hw); another grid cannot be derived from a non-square table and is refused.
  state = _timm_state()
  state['pos_embed'] = W.resize_posemb(state['pos_embed'], (8, 4))
  path = str(tmp_path / 'reid.safetensors')
  save_file(state, path)
  _, params = model_and_params('vit', (64, 32))
  for grid_hw in (None, (8, 4)):
    new, report = W.load_pretrained(path, params, CONFIGS['vit'], grid_hw=grid_hw)
    np.testing.assert_array_equal(new['embed']['pos_embed'], state['pos_embed'])
    assert not report.notes
  _, params = model_and_params('vit', (48, 24))
  with pytest.raises(W.WeightLoadError, match='32 patches are no square grid'):
    W.load_pretrained(path, params, CONFIGS['vit'], grid_hw=(6, 3))


def test_head_not_loaded_by_default_and_input_untouched():
  _, params = model_and_params('vit', 32)
  before = copy.deepcopy(params)
  new, report = W.load_pretrained(os.path.join(FIX, 'vit.safetensors'), params, CONFIGS['vit'])
  assert sorted(report.newly_initialized) == ['head/bias', 'head/kernel']
  assert any(u.startswith('head.weight') and 'load_head=False' in u for u in report.unused)
  assert new['head']['kernel'] is params['head']['kernel']  # left as initialised
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)  # input not mutated
  assert 'Newly initialised' in report.summary() and 'head' in report.summary()


def test_frozendict_and_shape_leaves():
  from flax.core import freeze  # pylint: disable=g-import-not-at-top
  _, params = model_and_params('vit', 32)
  shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  new, report = W.load_pretrained(os.path.join(FIX, 'vit.npz'), freeze(shapes), CONFIGS['vit'])
  assert type(new).__name__ == 'FrozenDict'
  assert isinstance(new['head']['kernel'], jax.ShapeDtypeStruct)  # untouched
  np.testing.assert_array_equal(new['embed']['cls_token'], _timm_state()['cls_token'])
  assert report.layout == 'google_npz'


def test_dcal_style_tree_extra_params_reported():
  _, params = model_and_params('vit', 32)
  tree = dict(params)
  tree['glca_block'] = {'w': np.zeros((3,), np.float32)}
  tree['loss_weights'] = np.zeros((3,), np.float32)
  tree['glca_head'] = params['head']
  _, report = W.load_pretrained(os.path.join(FIX, 'vit.npz'), tree, CONFIGS['vit'])
  assert {'glca_block/w', 'loss_weights', 'glca_head/kernel'} <= set(report.newly_initialized)
  # The checkpoint head can also be routed into several heads.
  new, report = W.load_pretrained(os.path.join(FIX, 'vit.npz'), tree, CONFIGS['vit'],
                                  load_head=True, head_name=('head', 'glca_head'))
  np.testing.assert_array_equal(new['glca_head']['kernel'], new['head']['kernel'])
  assert 'glca_head/kernel' in report.loaded


def test_wrong_shape_names_param_and_shapes():
  cfg = vit.ViTConfig(width=48, depth=2, num_heads=2, mlp_dim=96, patch_size=8)
  _, params = model_and_params('vit', 32, cfg)
  with pytest.raises(W.WeightLoadError) as e:
    W.load_pretrained(os.path.join(FIX, 'vit.safetensors'), params, cfg)
  msg = str(e.value)
  assert 'block_0/mlp/fc1/bias' in msg and '(192,)' in msg and '(96,)' in msg
  assert 'vit.safetensors' in msg and '\n' not in msg


def test_head_count_mismatch_in_npz():
  cfg = vit.ViTConfig(width=48, depth=2, num_heads=4, mlp_dim=192, patch_size=8)
  _, params = model_and_params('vit', 32, cfg)
  with pytest.raises(W.WeightLoadError, match='2 heads but the model has num_heads=4'):
    W.load_pretrained(os.path.join(FIX, 'vit.npz'), params, cfg)


def _timm_state(name='vit'):
  return W.read_checkpoint(os.path.join(FIX, f'{name}.safetensors'))


def test_missing_key(tmp_path):
  sd = _timm_state()
  del sd['blocks.1.mlp.fc2.weight']
  path = str(tmp_path / 'missing.safetensors')
  save_file(sd, path)
  _, params = model_and_params('vit', 32)
  with pytest.raises(W.WeightLoadError, match=r'lacks 1 parameter.*block_1/mlp/fc2/kernel'):
    W.load_pretrained(path, params, CONFIGS['vit'])
  _, report = W.load_pretrained(path, params, CONFIGS['vit'], strict=False)
  assert 'block_1/mlp/fc2/kernel' in report.newly_initialized


def test_unused_keys_reported(tmp_path):
  sd = _timm_state()
  sd['pre_logits.fc.weight'] = np.zeros((48, 48), np.float32)
  path = str(tmp_path / 'extra.safetensors')
  save_file(sd, path)
  cfg = vit.ViTConfig(width=48, depth=1, num_heads=2, mlp_dim=192, patch_size=8)
  _, params = model_and_params('vit', 32, cfg)
  _, report = W.load_pretrained(path, params, cfg)
  unused = '\n'.join(report.unused)
  assert 'blocks.1.attn.qkv.weight (block beyond the model depth)' in unused
  assert 'pre_logits.fc.weight (pre-logits' in unused
  assert 'blocks.1.attn.qkv.weight' in report.summary()


def test_deit_distilled_dist_token_dropped(tmp_path, expected):
  sd = _timm_state()
  pe = sd['pos_embed']
  sd['pos_embed'] = np.concatenate([pe[:, :1], np.full_like(pe[:, :1], 7.0), pe[:, 1:]], axis=1)
  sd['dist_token'] = np.ones((1, 1, 48), np.float32)
  sd['head_dist.weight'] = np.ones((10, 48), np.float32)
  sd['head_dist.bias'] = np.ones((10,), np.float32)
  path = str(tmp_path / 'distilled.safetensors')
  save_file(sd, path)
  apply, params = model_and_params('vit', 32)
  new, report = W.load_pretrained(path, params, CONFIGS['vit'], load_head=True)
  assert any(u.startswith('dist_token (DeiT distillation') for u in report.unused)
  assert any(u.startswith('head_dist.weight') for u in report.unused)
  logits = np.asarray(apply(new, nhwc(expected['inputs_32'])))
  np.testing.assert_allclose(logits, expected['vit_logits_32'], atol=1e-4, rtol=0)


def test_layer_scale_refused(tmp_path):
  sd = _timm_state()
  sd['blocks.0.ls1.gamma'] = np.ones((48,), np.float32)
  path = str(tmp_path / 'ls.safetensors')
  save_file(sd, path)
  _, params = model_and_params('vit', 32)
  with pytest.raises(W.WeightLoadError, match='layer scale'):
    W.load_pretrained(path, params, CONFIGS['vit'])


def test_unknown_format(tmp_path):
  path = tmp_path / 'weights.ckpt'
  path.write_text('this is not a checkpoint\n')
  with pytest.raises(W.WeightLoadError, match='weights.ckpt: unknown checkpoint format'):
    W.read_checkpoint(path)
  with pytest.raises(W.WeightLoadError, match='no such checkpoint file'):
    W.read_checkpoint(tmp_path / 'absent.npz')
  other = tmp_path / 'other.npz'
  np.savez(other, foo=np.zeros(3))
  _, params = model_and_params('vit', 32)
  with pytest.raises(W.WeightLoadError, match='unrecognised checkpoint layout'):
    W.load_pretrained(other, params, CONFIGS['vit'])


@pytest.mark.parametrize('ext', ['npz', 'safetensors', 'pth', 'legacy.pth'])
def test_truncated_file(tmp_path, ext):
  with open(os.path.join(FIX, f'vit.{ext}'.replace('.legacy', '_legacy')), 'rb') as f:
    data = f.read()
  path = tmp_path / f'cut.{ext}'
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(W.WeightLoadError) as e:
    W.read_checkpoint(path)
  assert f'cut.{ext}' in str(e.value) and '\n' not in str(e.value)


def test_pickle_npz_refused(tmp_path):
  path = tmp_path / 'pickled.npz'
  np.savez(path, **{'embedding/kernel': np.array([{'a': 1}], dtype=object)})
  with pytest.raises(W.WeightLoadError, match='pickle'):
    W.read_checkpoint(path)
  assert zipfile.is_zipfile(path)


@pytest.fixture
def no_torch(monkeypatch):
  """`import torch` fails, as in the test environment: weights.py's own reader runs."""
  monkeypatch.setitem(sys.modules, 'torch', None)


@pytest.mark.parametrize('name', ['torch_layouts.pth', 'torch_layouts_legacy.pth'])
def test_torch_save_read_without_torch_equals_torch(no_torch, name):
  """Zip and legacy torch.save files: every dtype, a transposed tensor, a slice at a storage
  offset, views sharing a storage, a Parameter, 0-d and empty tensors, each equal to torch's own
  `.numpy()` (torch_layouts.npz, written by torch), with the `model` wrapper unwrapped."""
  with np.load(os.path.join(FIX, 'torch_layouts.npz')) as f:
    want = {k: f[k] for k in f.files}
  got = W.read_checkpoint(os.path.join(FIX, name))
  assert got.keys() == want.keys()
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize('name', ['vit.pth', 'vit_legacy.pth'])
def test_timm_pth_read_without_torch_equals_safetensors(no_torch, name):
  got, want = W.read_checkpoint(os.path.join(FIX, name)), _timm_state()
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.skipif(not HAS_TORCH, reason='torch not installed')
@pytest.mark.parametrize('name', ['vit.pth', 'vit_legacy.pth', 'torch_layouts.pth'])
def test_torch_load_and_our_reader_agree(name, monkeypatch):
  path = os.path.join(FIX, name)
  with_torch = W.read_checkpoint(path)
  monkeypatch.setitem(sys.modules, 'torch', None)
  without = W.read_checkpoint(path)
  assert with_torch.keys() == without.keys()
  for key in with_torch:
    np.testing.assert_array_equal(with_torch[key], without[key], err_msg=key)


class _MakeDir:
  """A pickle that, if loaded by a plain unpickler, creates a directory."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


@pytest.mark.parametrize('layout', ['zip', 'legacy'])
def test_torch_pickle_naming_other_code_is_refused_unrun(no_torch, tmp_path, layout):
  marker = tmp_path / 'ran'
  payload = pickle.dumps({'weight': _MakeDir(str(marker))}, protocol=2)
  path = tmp_path / 'evil.pth'
  if layout == 'zip':  # torch's zip layout: <archive>/data.pkl
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('evil/data.pkl', payload)
      archive.writestr('evil/byteorder', 'little')
  else:  # legacy: magic, protocol, sys_info, then the object
    path.write_bytes(b''.join(pickle.dumps(v, protocol=2) for v in (
        0x1950a86a20f9469cfc6c, 1001, {'little_endian': True})) + payload)
  with pytest.raises(W.WeightLoadError, match=r'evil\.pth: .*mkdir, which is refused') as e:
    W.read_checkpoint(path)
  assert '\n' not in str(e.value)
  assert not marker.exists()  # the refused global was never called


# ---------------------------------------------------------------------------------------------
# resize_posemb
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('grid', [3, 4, 9, 12, 13])
def test_resize_posemb_bicubic_matches_timm(expected, grid):
  out = W.resize_posemb(expected['posemb_src'], grid, 'bicubic')
  ref = expected[f'posemb_bicubic_{grid}']
  assert out.shape == ref.shape == (1, 1 + grid * grid, 8)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


# (source side, target (height, width)): 14 -> (16, 8) is a 224 px checkpoint at 256x128 persons.
NON_SQUARE_POSEMB = [(6, (16, 8)), (6, (4, 9)), (14, (16, 8))]


@pytest.mark.parametrize('source_side,grid_hw', NON_SQUARE_POSEMB,
                         ids=[f'{s}to{h}x{w}' for s, (h, w) in NON_SQUARE_POSEMB])
def test_resize_posemb_non_square_bicubic_matches_timm(expected, source_side, grid_hw):
  source = expected['posemb_src' if source_side == 6 else f'posemb_src_{source_side}']
  height, width = grid_hw
  out = W.resize_posemb(source, grid_hw, 'bicubic')
  ref = expected[f'posemb_bicubic_{source_side}_to_{height}x{width}']
  assert out.shape == ref.shape == (1, 1 + height * width, 8)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(out[:, :1], source[:, :1])  # CLS slot kept


@pytest.mark.parametrize('grid_hw', [3, 4, 9, 12, 13, (16, 8), (4, 9)])
def test_resize_posemb_bilinear_matches_scipy_zoom(expected, grid_hw):
  ndimage = pytest.importorskip('scipy.ndimage')
  height, width = (grid_hw, grid_hw) if isinstance(grid_hw, int) else grid_hw
  posemb = expected['posemb_src'].astype(np.float64)
  # The original ViT code (vit_jax/checkpoint.py): zoom the grid with order=1, keep the CLS slot.
  grid = posemb[0, 1:].reshape(6, 6, -1)
  zoomed = ndimage.zoom(grid, (height / 6, width / 6, 1), order=1)
  ref = np.concatenate([posemb[:, :1], zoomed.reshape(1, height * width, -1)], axis=1)
  out = W.resize_posemb(posemb, grid_hw, 'bilinear')
  np.testing.assert_allclose(out, ref, atol=1e-10, rtol=0)


def test_resize_posemb_identity_and_errors(expected):
  pe = expected['posemb_src']
  np.testing.assert_array_equal(W.resize_posemb(pe, 6, 'bicubic'), pe)
  out = W.resize_posemb(pe, 9, 'bicubic')
  np.testing.assert_array_equal(out[:, :1], pe[:, :1])  # CLS slot kept
  with pytest.raises(ValueError, match='unknown posemb interpolation'):
    W.resize_posemb(pe, 9, 'nearest')
  with pytest.raises(ValueError, match='not square'):
    W.resize_posemb(pe[:, :-1], 9, 'bicubic')


# ---------------------------------------------------------------------------------------------
# GLCA's start from a pretrained load (train_step.load_pretrained_params)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('from_sa', [True, False])
def test_glca_block_starts_as_the_loaded_last_block(from_sa):
  """DCAL's params from the timm fixture: with glca_init_from_sa the GLCA block is a copy of the
  *loaded* last block (timm's blocks.1, after the load, not the init nor block_0); without it,
  GLCA keeps its initialisation. The GLCA norm and head are not in the checkpoint either way."""
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top

  from dca_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = tiny_config(pretrained_model=os.path.join(FIX, 'vit.safetensors'),
                       glca_init_from_sa=from_sa)
  config.backbone_overrides.update(width=48, depth=2, num_heads=2, mlp_dim=192, patch_size=8)
  model = build_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes['params'])
  loaded = train_step.load_pretrained_params(config, params)
  timm = _timm_state()
  np.testing.assert_array_equal(loaded['block_1']['attn']['qkv']['kernel'],
                                timm['blocks.1.attn.qkv.weight'].T)
  glca = loaded['glca_block']
  if from_sa:
    jax.tree_util.tree_map(np.testing.assert_array_equal, glca, loaded['block_1'])
    assert glca['attn']['qkv']['kernel'] is not loaded['block_1']['attn']['qkv']['kernel']
    assert not np.array_equal(glca['mlp']['fc1']['kernel'],
                              loaded['block_0']['mlp']['fc1']['kernel'])
  else:
    jax.tree_util.tree_map(lambda a: np.testing.assert_array_equal(a, 0.5), glca)
  for name in ('glca_norm', 'glca_head'):
    jax.tree_util.tree_map(lambda a: np.testing.assert_array_equal(a, 0.5), loaded[name])
