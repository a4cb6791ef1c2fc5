"""DCAL model tests, each against an independent reference (METHOD.md's equations in numpy).

`NumpyDCAL` below is a float64 numpy forward pass of the tiny ViT written from the paper's
description (pre-LN blocks, CLS token, rollout, top-R, [K1; K2] softmax) and reading only the
parameter tree: nothing of dcal.py / vit.py is reused, so it checks the model end to end.
"""

import functools
import importlib
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax import losses
from dca_jax.models import build_model, dcal, vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = vit.ViTConfig(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=8)
SIZE, B, NC = 32, 4, 5          # 32 px / patch 8 -> 16 patches, 17 tokens
RATIO = 0.25                    # -> R = 4 patches


# --- independent numpy reference -------------------------------------------------------------
_erf = np.vectorize(math.erf)


def np_ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def np_dense(x, p):
  return x @ p['kernel'] + p['bias']


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_qkv(p, x, heads):
  b, n, d = x.shape
  qkv = np_dense(np_ln(x, p['norm1']), p['attn']['qkv']).reshape(b, n, 3, heads, d // heads)
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def np_block(p, x, heads, query_index=None, extra_kv=None):
  """One pre-LN block; query_index: GLCA's query rows; extra_kv: PWCA's partner keys/values.
  Returns (out, (k, v), head-mean attention)."""
  b, _, d = x.shape
  q, k, v = np_qkv(p, x, heads)
  if query_index is not None:
    rows = np.arange(b)[:, None]
    q, x = q[rows, query_index], x[rows, query_index]
  keys, values = k, v
  if extra_kv is not None:
    keys = np.concatenate([k, extra_kv[0]], 1)
    values = np.concatenate([v, extra_kv[1]], 1)
  logits = np.einsum('bqhd,bkhd->bhqk', q, keys) / math.sqrt(d // heads)
  w = np_softmax(logits)
  o = np.einsum('bhqk,bkhd->bqhd', w, values).reshape(b, q.shape[1], d)
  x = x + np_dense(o, p['attn']['proj'])
  h = np_dense(np_ln(x, p['norm2']), p['mlp']['fc1'])
  h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
  x = x + np_dense(h, p['mlp']['fc2'])
  return x, (k, v), w.mean(1)


def np_embed(p, images, patch):
  b, hh, ww, c = images.shape
  h, w = hh // patch, ww // patch
  t = images.reshape(b, h, patch, w, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, -1)
  kern = p['patch_embed']['kernel']  # HWIO: (kh, kw, cin) flattens like the patch above
  x = t @ kern.reshape(-1, kern.shape[-1]) + p['patch_embed']['bias']
  cls = np.broadcast_to(p['cls_token'], (b, 1, x.shape[-1]))
  return np.concatenate([cls, x], 1) + p['pos_embed']


def np_rollout(maps):
  """METHOD.md: S̄_i = 0.5 S_i + 0.5 I, rows re-normalised, Ŝ_i = S̄_i Ŝ_{i-1}, Ŝ_0 = I; CLS row."""
  n = maps[0].shape[-1]
  acc = np.broadcast_to(np.eye(n), maps[0].shape)
  for s in maps:
    sbar = 0.5 * s + 0.5 * np.eye(n)
    sbar = sbar / sbar.sum(-1, keepdims=True)
    acc = np.einsum('bij,bjk->bik', sbar, acc)
  return acc[:, 0]


def np_topr(cls_row, ratio, lowest=False):
  """CLS (0) + the round(ratio·N) patch indices of highest (or lowest) rollout, by numpy
  argsort."""
  patches = cls_row[:, 1:]
  r = int(round(ratio * patches.shape[1]))
  top = np.argsort(patches if lowest else -patches, axis=1, kind='stable')[:, :r] + 1
  return np.concatenate([np.zeros((len(top), 1), int), top], 1)


def np_dcal(params, images, *, heads, patch, depth, ratio, num_pwca=0, partner=None,
            glca_input='parallel', glca_pool='cls', rollout_layers='before_glca',
            glca_select='rollout', index=None):
  """METHOD.md's DCAL forward. The rollout covers blocks 1..L-1 (GLCA parallel to block L) or
  1..L ('all', or GLCA on top of block L); glca_select 'last_layer' ranks patches by the last
  of those blocks' attention alone; `index` overrides the selection (e.g. a random one)."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = np_embed(p['embed'], np.asarray(images, np.float64), patch)
  x_pw, maps, glca_in = None, [], None
  for i in range(depth):
    bp = p[f'block_{i}']
    if partner is not None and num_pwca and i == depth - num_pwca:
      x_pw = x
    if i == depth - 1:
      glca_in = x
    x_new, (k, v), m = np_block(bp, x, heads)
    if x_pw is not None:
      x_pw, _, _ = np_block(bp, x_pw, heads, extra_kv=(k[partner], v[partner]))
    maps.append(m)
    x = x_new
  covered = maps[:-1] if rollout_layers == 'before_glca' and glca_input == 'parallel' else maps
  out = {'maps': maps, 'rollout': np_rollout(covered)}
  sa_feature = np_ln(x, p['norm'])[:, 0]
  out['sa_logits'] = np_dense(sa_feature, p['head'])
  out['sa_feature'] = sa_feature
  if index is None:
    index = np_topr(np_rollout(covered[-1:]) if glca_select == 'last_layer' else out['rollout'],
                    ratio, lowest=glca_select == 'rollout_lowest')
  if glca_input == 'on_top':
    glca_in = x
  g, _, _ = np_block(p['glca_block'], glca_in, heads, query_index=index)
  out['glca_index'] = index
  g = np_ln(g, p['glca_norm'])
  pooled = {'cls': g[:, 0], 'mean': g.mean(axis=1), 'local': g[:, 1:].mean(axis=1)}[glca_pool]
  out['glca_logits'] = np_dense(pooled, p['glca_head'])
  if x_pw is not None:
    out['pwca_logits'] = np_dense(np_ln(x_pw, p['norm'])[:, 0], p['head'])
  return out


# --- helpers -----------------------------------------------------------------------------------
def randomize(params, seed):
  """Weights large enough for peaked attention (the 0.02 init gives near-uniform maps, whose
  top-R would be decided by float noise)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    if 'kernel' in name:
      fan_in = int(np.prod(shape[:-1]))
      val = rng.normal(0, 1.5 / math.sqrt(fan_in), shape)
    elif 'scale' in name:
      val = 1.0 + 0.2 * rng.normal(size=shape)
    elif 'loss_weights' in name:
      val = np.zeros(shape)
    else:  # biases, cls_token, pos_embed
      val = 0.3 * rng.normal(size=shape)
    out.append(jnp.asarray(val, leaf.dtype))
  return jax.tree_util.tree_unflatten(tree, out)


def make_model(config=TINY, **kw):
  kw.setdefault('num_pwca_layers', config.depth)
  kw.setdefault('top_k_ratio', RATIO)
  return dcal.DCAL(config, num_classes=NC, **kw)


def init_params(model, seed=0, batch=B, size=SIZE):
  """The model's parameter tree (shapes from eval_shape), filled by `randomize`."""
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  partner = jnp.roll(jnp.arange(batch), 1)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(seed), x, partner=partner), x)
  return randomize(params['params'], seed)




def japply(model, params, x, partner=None, with_selection=False, rngs=None):
  """model.apply (inference, or PWCA when partner is given), jitted."""
  fn = jax.jit(lambda p, x, partner, rngs: model.apply(
      {'params': p}, x, partner=partner, with_selection=with_selection, rngs=rngs))
  return fn(params, x, partner, rngs)


def jblock(*static):
  """EncoderBlock.apply with its positional flags bound, jitted (run eagerly, every op of the
  block compiles on its own: seconds per call on CPU)."""
  blk = vit.EncoderBlock(TINY.width, TINY.num_heads, TINY.mlp_dim)
  return jax.jit(lambda p, x, *arrays: blk.apply(p, x, *static, *arrays))


def images(seed=1, batch=B, size=SIZE):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3))


def block_params(params, i):
  return {'params': params[f'block_{i}']}


TOL = dict(rtol=2e-4, atol=2e-5)


# --- rollout -----------------------------------------------------------------------------------
@pytest.mark.parametrize('impl', ['vector', 'running_product'])
@pytest.mark.parametrize('depth', [1, 2, 5])
def test_rollout_composition_matches_numpy_equation(depth, impl):
  rng = np.random.default_rng(depth)
  n = 9
  maps = rng.random((depth, 3, n, n)) ** 3
  maps /= maps.sum(-1, keepdims=True)  # row-stochastic head-mean maps
  got = dcal.rollout_cls_row([jnp.asarray(m, jnp.float32) for m in maps], impl)
  want = np_rollout(list(maps))  # the full forward product Ŝ_i = S̄_i Ŝ_{i-1}, then its CLS row
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-5)  # still a distribution


def test_vector_rollout_has_no_cubic_term():
  """XLA's FLOP count of the CLS row from L = 12 maps of 785 tokens (DeiT-T at 448 px): the
  vector chain is 11 vector-matrix products (+ forming S̄), the running product ~10·785³ MACs."""
  n, depth = 785, 12
  maps = [jax.ShapeDtypeStruct((1, n, n), jnp.float32)] * (depth - 1)
  flops = {impl: jax.jit(functools.partial(dcal.rollout_cls_row, impl=impl)).lower(maps)
           .compile().cost_analysis()['flops'] for impl in ('vector', 'running_product')}
  assert flops['vector'] < 0.1e9, flops        # the bound: under 0.1 GFLOP per image
  assert flops['running_product'] > 2 * (depth - 3) * n ** 3, flops


def test_model_forward_matches_numpy_reference():
  """Rollout of the model's own per-block head-mean attention, SA/GLCA logits, GLCA selection."""
  model = make_model()
  params = init_params(model)
  x = images()
  out = japply(model, params, x, with_selection=True)
  ref = np_dcal(params, x, heads=TINY.num_heads, patch=TINY.patch_size, depth=TINY.depth,
                ratio=RATIO)
  np.testing.assert_allclose(out['rollout'], ref['rollout'], **TOL)
  # the selection is decided by clear margins (else the comparison would test float noise)
  srt = -np.sort(-ref['rollout'][:, 1:], axis=1)
  assert (srt[:, 3] - srt[:, 4]).min() > 1e-4
  np.testing.assert_array_equal(np.asarray(out['glca_index']), ref['glca_index'])
  np.testing.assert_allclose(out['sa_logits'], ref['sa_logits'], **TOL)
  np.testing.assert_allclose(out['sa_feature'], ref['sa_feature'], **TOL)
  np.testing.assert_allclose(out['glca_logits'], ref['glca_logits'], **TOL)
  assert 'pwca_logits' not in out


def test_block_head_mean_attention_matches_numpy():
  model = make_model()
  params = init_params(model)
  x = np.asarray(images(), np.float64)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  h = np_embed(p64['embed'], x, TINY.patch_size)
  block = jblock(True, True)
  for i in range(TINY.depth):
    y, (k, v), m = block(block_params(params, i), jnp.asarray(h, jnp.float32))
    ry, (rk, rv), rm = np_block(p64[f'block_{i}'], h, TINY.num_heads)
    np.testing.assert_allclose(m, rm, **TOL)
    np.testing.assert_allclose(y, ry, **TOL)
    np.testing.assert_allclose(k, rk, **TOL)
    np.testing.assert_allclose(v, rv, **TOL)
    np.testing.assert_allclose(np.asarray(m).sum(-1), 1.0, rtol=1e-5)
    h = ry


@pytest.mark.parametrize('dtype,bound', [(jnp.bfloat16, 0.04), (jnp.float16, 0.005)])
def test_half_precision_forward_matches_fp32(dtype, bound):
  """build_model(dtype=bf16/fp16): fp32 params, half-precision compute, fp32 outputs within the
  format's precision of the fp32 forward (relative error of each array; measured 0.4-1.2 % for
  bf16, 0.08-0.12 % for fp16), and not equal to it (the dtype is really used)."""
  params = init_params(make_model())
  x = images()
  ref = japply(make_model(), params, x, with_selection=True)
  out = japply(make_model(dtype=dtype), params, x, with_selection=True)
  for key in ('sa_logits', 'glca_logits', 'sa_feature', 'glca_feature', 'rollout'):
    assert out[key].dtype == jnp.float32, key
    got, want = np.asarray(out[key], np.float64), np.asarray(ref[key], np.float64)
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-4 < error < bound, (key, error)


# --- token selection ---------------------------------------------------------------------------
@pytest.mark.parametrize('n,ratio', [(16, 0.25), (49, 0.1), (784, 0.1), (196, 0.3), (10, 1.0)])
def test_select_tokens_is_cls_plus_top_r(n, ratio):
  rng = np.random.default_rng(n)
  cls_row = rng.random((3, n + 1)).astype(np.float32)
  cls_row[:, 0] = 10.0  # a large CLS column must not be selected as a patch
  idx = np.asarray(dcal.select_tokens(jnp.asarray(cls_row), ratio))
  r = int(round(ratio * n))
  assert idx.shape == (3, 1 + r)
  assert (idx[:, 0] == 0).all() and (idx[:, 1:] > 0).all()
  want = np_topr(cls_row, ratio)
  for b in range(3):
    assert set(idx[b, 1:]) == set(want[b, 1:])
    assert len(set(idx[b])) == 1 + r
  np.testing.assert_array_equal(idx, want)  # ordered by decreasing rollout too


def test_r_is_78_of_784_at_448px():
  cfg = vit.get_variant('deit_tiny')
  assert cfg.num_patches(448) == 784
  assert dcal.num_selected(784, 0.1) == 78
  assert dcal.num_selected(784, 0.3) == 235
  model = dcal.DCAL(cfg, num_classes=200)
  x = jax.ShapeDtypeStruct((1, 448, 448, 3), jnp.float32)
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x,
                                                       with_selection=True)[0], x)
  assert out['glca_index'].shape == (1, 79)
  assert out['rollout'].shape == (1, 785)


# --- GLCA --------------------------------------------------------------------------------------
def test_glca_all_queries_equals_self_attention_block():
  """Local queries = all tokens (in any order): GLCA is the SA block, rows permuted."""
  model = make_model()
  params = init_params(model)
  x = jax.random.normal(jax.random.PRNGKey(3), (B, 17, TINY.width))
  bp = block_params(params, 1)
  sa, _, _ = jblock()(bp, x)
  perm = jnp.stack([jax.random.permutation(jax.random.PRNGKey(b), 17) for b in range(B)])
  glca, _, _ = jblock(True, False)(bp, x, perm)
  # compare after sorting rows back by token index
  unperm = jnp.take_along_axis(glca, jnp.argsort(perm, axis=1)[:, :, None], axis=1)
  np.testing.assert_allclose(unperm, sa, rtol=1e-5, atol=1e-5)


def test_glca_r100_with_sa_weights_equals_sa_branch():
  model = make_model(top_k_ratio=1.0)
  params = dict(init_params(model))
  params['glca_block'] = params[f'block_{TINY.depth - 1}']
  params['glca_norm'] = params['norm']
  params['glca_head'] = params['head']
  out = japply(model, params, images(), with_selection=True)
  assert out['glca_index'].shape == (B, 17)
  assert sorted(np.asarray(out['glca_index'])[0]) == list(range(17))
  np.testing.assert_allclose(out['glca_logits'], out['sa_logits'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['glca_feature'], out['sa_feature'], rtol=1e-5, atol=1e-5)
  # R < 100 %: GLCA keeps only the CLS + R selected query rows, and each equals SA's row of that
  # token (a row depends on its own query only), so under glca_pool='mean' GLCA's feature is
  # the mean of SA's normalised output tokens at the selection: rebuilt here in numpy
  mean_model = make_model(glca_pool='mean')
  out = japply(mean_model, params, images(), with_selection=True)
  index = np.asarray(out['glca_index'])
  assert index.shape == (B, 5)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  tokens = np_embed(p64['embed'], np.asarray(images(), np.float64), TINY.patch_size)
  for i in range(TINY.depth):
    tokens = np_block(p64[f'block_{i}'], tokens, TINY.num_heads)[0]
  rows = np_ln(tokens, p64['norm'])[np.arange(B)[:, None], index]
  np.testing.assert_allclose(out['glca_feature'], rows.mean(axis=1), **TOL)
  np.testing.assert_allclose(out['glca_logits'], np_dense(rows.mean(axis=1), p64['head']), **TOL)
  assert np.abs(np.asarray(out['glca_feature']) - np.asarray(out['sa_feature'])).max() > 1e-2


def test_glca_cls_output_does_not_depend_on_the_selection():
  """METHOD.md's GLCA (M = 1, CLS kept as a query, CLS output -> classifier): an attention
  row depends only on its own query, so the CLS output is the same whatever local queries
  accompany it. With M = 1 the rollout/top-R choice cannot reach the GLCA logits or any loss;
  GLCA is then a second, separately weighted last block on the CLS token. (Reported in
  docs/MODEL.md; this test pins the behaviour so a change of design is noticed.)"""
  model = make_model()
  params = init_params(model)
  x = images()
  logits = [japply(make_model(top_k_ratio=r), params, x)['glca_logits'] for r in (1 / 16, 1.0)]
  for l in logits[1:]:
    np.testing.assert_allclose(l, logits[0], rtol=1e-5, atol=1e-5)
  # block level: CLS row for two disjoint random selections
  glca = jblock(True, False)
  h = jax.random.normal(jax.random.PRNGKey(3), (B, 17, TINY.width))
  a = jnp.tile(jnp.array([[0, 1, 2, 3]]), (B, 1))
  b = jnp.tile(jnp.array([[0, 9, 12, 16]]), (B, 1))
  ya = glca({'params': params['glca_block']}, h, a)[0]
  yb = glca({'params': params['glca_block']}, h, b)[0]
  np.testing.assert_allclose(ya[:, 0], yb[:, 0], rtol=1e-6, atol=1e-6)


def test_glca_mean_pool_matches_numpy_and_depends_on_the_selection():
  """glca_pool='mean' (CLS + the R local outputs) is where the token selection reaches the logits."""
  params = init_params(make_model(glca_pool='mean'))
  x = images()
  out = japply(make_model(glca_pool='mean'), params, x)
  ref = np_dcal(params, x, heads=TINY.num_heads, patch=TINY.patch_size, depth=TINY.depth,
                ratio=RATIO, glca_pool='mean')
  np.testing.assert_allclose(out['glca_logits'], ref['glca_logits'], **TOL)
  other = japply(make_model(glca_pool='mean', top_k_ratio=1.0), params, x)
  assert np.abs(np.asarray(other['glca_logits']) - np.asarray(out['glca_logits'])).max() > 1e-4


def test_glca_on_top_input_matches_numpy():
  model = make_model(glca_input='on_top')
  params = init_params(model)
  x = images()
  out = japply(model, params, x)
  ref = np_dcal(params, x, heads=TINY.num_heads, patch=TINY.patch_size, depth=TINY.depth,
                ratio=RATIO, glca_input='on_top')
  np.testing.assert_allclose(out['glca_logits'], ref['glca_logits'], **TOL)


@pytest.mark.parametrize('rollout_layers,glca_input', [('before_glca', 'parallel'),
                                                        ('all', 'parallel'),
                                                        ('before_glca', 'on_top')])
@pytest.mark.parametrize('glca_select', ['rollout', 'last_layer', 'rollout_lowest'])
def test_selection_knobs_match_numpy(rollout_layers, glca_input, glca_select):
  """Rollout depth (blocks 1..L-1 before a parallel GLCA, or 1..L), the last-layer ablation and
  the 'local' pooling (mean of the R local outputs), against METHOD.md's equations."""
  kw = dict(glca_pool='local', rollout_layers=rollout_layers, glca_input=glca_input,
            glca_select=glca_select)
  model = make_model(**kw)
  params = init_params(model)
  x = images()
  out = japply(model, params, x)
  ref = np_dcal(params, x, heads=TINY.num_heads, patch=TINY.patch_size, depth=TINY.depth,
                ratio=RATIO, **kw)
  if glca_select != 'last_layer':
    np.testing.assert_allclose(out['rollout'], ref['rollout'], **TOL)
  np.testing.assert_array_equal(np.asarray(out['glca_index']), ref['glca_index'])
  np.testing.assert_allclose(out['glca_logits'], ref['glca_logits'], **TOL)


def test_rollout_depth_changes_the_selection():
  """'before_glca' and 'all' are different rollouts (else the knob would be decorative)."""
  params = init_params(make_model())
  x = images()
  rows = [np.asarray(japply(make_model(rollout_layers=r), params, x, with_selection=True)
                     ['rollout']) for r in ('before_glca', 'all')]
  assert np.abs(rows[0] - rows[1]).max() > 1e-3


def test_vector_and_running_product_rollouts_select_the_same_tokens():
  params = init_params(make_model())
  x = images()
  outs = [japply(make_model(rollout_impl=i, glca_pool='mean'), params, x)
          for i in ('vector', 'running_product')]
  np.testing.assert_allclose(outs[0]['rollout'], outs[1]['rollout'], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(outs[0]['glca_index'], outs[1]['glca_index'])
  np.testing.assert_array_equal(outs[0]['glca_logits'], outs[1]['glca_logits'])


def test_random_selection_is_a_random_r_subset_and_matches_numpy():
  model = make_model(glca_pool='local', glca_select='random')
  params = init_params(model)
  x = images()
  idx = []
  for seed in (0, 1):
    out = japply(model, params, x, rngs={'selection': jax.random.PRNGKey(seed)})
    index = np.asarray(out['glca_index'])
    assert index.shape == (B, 5) and (index[:, 0] == 0).all()
    for row in index:
      assert len(set(row[1:])) == 4 and 1 <= row[1:].min() and row[1:].max() <= 16
    ref = np_dcal(params, x, heads=TINY.num_heads, patch=TINY.patch_size, depth=TINY.depth,
                  ratio=RATIO, glca_pool='local', index=index)
    np.testing.assert_allclose(out['glca_logits'], ref['glca_logits'], **TOL)
    idx.append(index)
  assert (idx[0] != idx[1]).any()
  # no 'selection' rng (evaluation): a fixed draw, the same every call
  a, b = (np.asarray(japply(model, params, x)['glca_index']) for _ in range(2))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('pool', ['mean', 'local'])
def test_pooled_glca_logits_change_when_the_selection_is_perturbed(pool):
  """Under a pooling that reads the local outputs, other selected patches -> other logits."""
  params = init_params(make_model())
  x = images()
  base = japply(make_model(glca_pool=pool), params, x)
  other = japply(make_model(glca_pool=pool, glca_select='random'), params, x)
  assert (np.asarray(base['glca_index']) != np.asarray(other['glca_index'])).any()
  assert np.abs(np.asarray(base['glca_logits']) - np.asarray(other['glca_logits'])).max() > 1e-3
  np.testing.assert_array_equal(base['sa_logits'], other['sa_logits'])


def _jaxpr_and_flops(model, params, x, **kw):
  fn = lambda p, x: model.apply({'params': p}, x, **kw)
  flops = jax.jit(fn).lower(params, x).compile().cost_analysis()['flops']
  return str(jax.make_jaxpr(fn)(params, x)), flops


def test_no_dead_compute_when_the_selection_cannot_reach_the_outputs():
  """glca_pool='cls': no attention maps, rollout, top-k or local query rows are computed (the
  CLS query runs alone), with the same logits as the full computation the visualize mode runs."""
  model = make_model(glca_pool='cls')
  params = init_params(model)
  x = images()
  lean, full = japply(model, params, x), japply(model, params, x, with_selection=True)
  assert 'rollout' not in lean and 'glca_index' not in lean
  for k in ('sa_logits', 'glca_logits', 'glca_feature'):
    np.testing.assert_allclose(lean[k], full[k], rtol=1e-6, atol=1e-6)
  lean_jaxpr, lean_flops = _jaxpr_and_flops(model, params, x)
  full_jaxpr, full_flops = _jaxpr_and_flops(model, params, x, with_selection=True)
  assert 'top_k' not in lean_jaxpr and 'top_k' in full_jaxpr
  assert lean_flops < full_flops
  # 'mean' reads the local rows: there the selection is part of every forward pass
  assert 'top_k' in _jaxpr_and_flops(make_model(glca_pool='mean'), params, x)[0]


def test_loss_weights_start_at_their_configured_value():
  model = make_model(loss_weights_init=0.5)
  v = jax.jit(model.init)(jax.random.PRNGKey(0), images())
  np.testing.assert_array_equal(v['params']['loss_weights'], [0.5, 0.5, 0.5])


# --- Re-ID heads -------------------------------------------------------------------------------
def test_bnneck_is_pytorch_batchnorm1d_without_bias():
  """Training: batch statistics (biased variance), running stats with momentum 0.1 and the
  unbiased variance; inference: the running stats; no bias anywhere; PWCA leaves the stats."""
  rng = np.random.default_rng(0)
  f = rng.normal(2.0, 3.0, (6, 5))
  neck = dcal.BNNeck()
  v = neck.init(jax.random.PRNGKey(0), jnp.asarray(f, jnp.float32), train=False)
  assert set(v['params']) == {'scale'}
  scale = rng.normal(1.0, 0.1, 5)
  v = {'params': {'scale': jnp.asarray(scale, jnp.float32)}, 'batch_stats': v['batch_stats']}
  y, upd = neck.apply(v, jnp.asarray(f, jnp.float32), train=True, mutable=['batch_stats'])
  want = (f - f.mean(0)) / np.sqrt(f.var(0) + 1e-5) * scale
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd['batch_stats']['mean'], 0.1 * f.mean(0), rtol=1e-5)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 + 0.1 * f.var(0, ddof=1), rtol=1e-5)
  y = neck.apply({'params': v['params'], **upd}, jnp.asarray(f, jnp.float32), train=False)
  mean, var = 0.1 * f.mean(0), 0.9 + 0.1 * f.var(0, ddof=1)
  np.testing.assert_allclose(y, (f - mean) / np.sqrt(var + 1e-5) * scale, rtol=1e-5, atol=1e-5)
  _, same = neck.apply(v, jnp.asarray(f, jnp.float32), train=True, update_stats=False,
                       mutable=['batch_stats'])
  chex.assert_trees_all_equal(same['batch_stats'], v['batch_stats'])


def test_reid_model_has_necks_and_bias_free_classifiers():
  model = make_model(bnneck=True)
  partner = jnp.array([1, 2, 3, 0])
  v = jax.jit(model.init)(jax.random.PRNGKey(0), images(), partner=partner)
  for head in ('head', 'glca_head'):
    assert set(v['params'][head]) == {'kernel', 'bnneck'}
    assert set(v['batch_stats'][head]['bnneck']) == {'mean', 'var'}
  out, upd = jax.jit(lambda v, x, partner: model.apply(v, x, train=True, partner=partner,
                                                       mutable=['batch_stats']))(
      v, images(), partner)
  for k in ('sa_feature', 'sa_bn_feature', 'glca_feature', 'glca_bn_feature', 'pwca_feature'):
    assert out[k].shape == (B, TINY.width), k
  # SA's neck moved its running mean by exactly 0.1 x the batch mean of SA's features (PWCA's
  # pass through the same neck did not count)
  np.testing.assert_allclose(upd['batch_stats']['head']['bnneck']['mean'],
                             0.1 * np.asarray(out['sa_feature']).mean(0), rtol=1e-4, atol=1e-6)
  feat = dcal.reid_feature(out, after_bn=True)
  np.testing.assert_array_equal(feat[:, TINY.width:], out['glca_bn_feature'])


# --- PWCA --------------------------------------------------------------------------------------
def test_pwca_block_reduces_to_sa_without_partner():
  model = make_model()
  params = init_params(model)
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params['block_0'])
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (B, 17, TINY.width)), np.float64)
  partner = np.roll(np.arange(B), 1)
  sa, (k, v), _ = np_block(p64, x, TINY.num_heads)
  ref_pw, _, _ = np_block(p64, x, TINY.num_heads, extra_kv=(k[partner], v[partner]))
  # the model's block with extra_kv is the numpy [K1; K2] attention, and it differs from SA
  bp = block_params(params, 0)
  xf = jnp.asarray(x, jnp.float32)
  _, (kj, vj), _ = jblock()(bp, xf)
  pwca = jblock(True, False, None)
  pw, _, _ = pwca(bp, xf, (kj[partner], vj[partner]))
  np.testing.assert_allclose(pw, ref_pw, **TOL)
  assert np.abs(np.asarray(pw) - sa).max() > 1e-2
  # model-side exact identity: the image as its own partner duplicates every key/value, which
  # halves each softmax weight and leaves the SA output unchanged.
  own, _, _ = pwca(bp, xf, (kj, vj))
  np.testing.assert_allclose(own, sa, **TOL)


def test_pwca_stream_matches_numpy_and_self_partner_is_sa():
  model = make_model()
  params = init_params(model)
  x = images()
  partner = dcal.derangement(jax.random.PRNGKey(7), B)
  out = japply(model, params, x, partner)
  ref = np_dcal(params, x, heads=TINY.num_heads, patch=TINY.patch_size, depth=TINY.depth,
                ratio=RATIO, num_pwca=TINY.depth, partner=np.asarray(partner))
  np.testing.assert_allclose(out['pwca_logits'], ref['pwca_logits'], **TOL)
  np.testing.assert_allclose(out['sa_logits'], ref['sa_logits'], **TOL)  # SA unaffected
  assert np.abs(np.asarray(out['pwca_logits'] - out['sa_logits'])).max() > 1e-3
  own = japply(model, params, x, jnp.arange(B))
  np.testing.assert_allclose(own['pwca_logits'], own['sa_logits'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('t', [1, 2])
def test_pwca_with_t_less_than_l_starts_at_block_l_minus_t(t):
  model = make_model(num_pwca_layers=t)
  params = init_params(model)
  x = images()
  partner = np.array([2, 3, 1, 0])
  out = japply(model, params, x, jnp.asarray(partner))
  for start, match in ((TINY.depth - t, True), (TINY.depth - t - 1, False)):
    ref = np_dcal(params, x, heads=TINY.num_heads, patch=TINY.patch_size, depth=TINY.depth,
                  ratio=RATIO, num_pwca=TINY.depth - start, partner=partner)
    close = np.allclose(out['pwca_logits'], ref['pwca_logits'], **TOL)
    assert close == match, (start, match)


def _seeds(n):
  return jax.vmap(jax.random.PRNGKey)(jnp.arange(n))


@pytest.mark.parametrize('batch', [2, 3, 4, 5, 8, 16])
def test_derangement_is_a_permutation_without_fixed_points(batch):
  draws = np.asarray(jax.jit(jax.vmap(lambda key: dcal.derangement(key, batch)))(_seeds(200)))
  for p in draws:   # one compiled draw per seed, the same as calling it seed by seed
    assert sorted(p) == list(range(batch))
    assert (p != np.arange(batch)).all()


@pytest.mark.parametrize('batch,groups', [(8, 4), (16, 8), (6, 3), (8, 1)])
def test_per_group_partners_stay_in_their_group(batch, groups):
  draws = np.asarray(jax.jit(jax.vmap(
      lambda key: dcal.derangement_per_group(key, batch, groups)))(_seeds(50)))
  for partner in draws:
    size = batch // groups
    rows = partner.reshape(groups, size) if groups > 1 else partner.reshape(1, batch)
    for row in rows:                      # a derangement of the group's own positions
      assert sorted(row) == list(range(size)) and (row != np.arange(size)).all()
  with pytest.raises(ValueError, match='2 images per device'):
    dcal.derangement_per_group(jax.random.PRNGKey(0), 8, 8)


def test_partner_rows_of_groups_equal_a_global_take():
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  local = np.array([[1, 0], [1, 0], [1, 0], [1, 0]])  # swap within each pair of rows
  want = x[(np.arange(8) // 2) * 2 + local.reshape(-1)]
  np.testing.assert_array_equal(vit.partner_rows(jnp.asarray(x), jnp.asarray(local)), want)
  np.testing.assert_array_equal(vit.partner_rows(jnp.asarray(x), jnp.arange(8)[::-1]), x[::-1])


def test_derangement_needs_two_images():
  with pytest.raises(ValueError):
    dcal.derangement(jax.random.PRNGKey(0), 1)


# --- parameters / FLOPs ------------------------------------------------------------------------
def abstract_params(model, size, batch=2):
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  partner = jnp.roll(jnp.arange(batch), 1)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, partner=partner), x)


def test_pwca_adds_no_parameters():
  shapes = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype),
                                            abstract_params(make_model(num_pwca_layers=t), SIZE))
  assert shapes(TINY.depth) == shapes(0) == shapes(1)
  cfg = vit.get_variant('deit_tiny')
  full = jax.tree_util.tree_map(lambda a: a.shape, abstract_params(
      dcal.DCAL(cfg, num_classes=200, num_pwca_layers=12), 224))
  none = jax.tree_util.tree_map(lambda a: a.shape, abstract_params(
      dcal.DCAL(cfg, num_classes=200, num_pwca_layers=0), 224))
  assert full == none


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def test_deit_tiny_dcal_has_about_9_percent_more_parameters():
  cfg = vit.get_variant('deit_tiny')
  x = jax.ShapeDtypeStruct((1, 448, 448, 3), jnp.float32)
  sa = _count(jax.eval_shape(lambda x: vit.VisionTransformer(cfg, 200).init(
      jax.random.PRNGKey(0), x), x))
  dc = _count(jax.eval_shape(lambda x: dcal.DCAL(cfg, 200).init(jax.random.PRNGKey(0), x), x))
  extra = 100.0 * (dc / sa - 1.0)
  assert 7.0 <= extra <= 11.0, extra  # paper: +9%
  # independent count of what GLCA adds: one block (+2 LN), one LN, one head, 3 loss weights
  d, m = cfg.width, cfg.mlp_dim
  blk = 3 * d * d + 3 * d + d * d + d + d * m + m + m * d + d + 4 * d
  assert dc - sa == blk + 2 * d + d * 200 + 200 + 3


def _tools_module(name):
  return importlib.import_module(f'tools.{name}')


@pytest.mark.slow  # compiles seven full-size DeiT-T programs
def test_inference_flops_glca_adds_about_2_percent():
  """XLA cost analysis, DeiT-Tiny 448 px batch 1: SA+GLCA vs SA (paper +2%), with the vector
  rollout (under 0.1 GFLOP) and with the running product ((L-3)·785^3 multiply-adds). What GLCA
  adds is counted here by hand (2 flops per multiply-add) and XLA's count must match it to a few
  per cent: a regression of a fraction of a per cent of the model (e.g. the rollout run under
  glca_pool='cls', or all 785 query rows kept) is 10-30 % of GLCA's share."""
  costs = _tools_module('model_costs')
  f = costs.inference_flops('deit_tiny', 448, 200)
  d, m, n, c, layers, heads = 192, 768, 785, 200, 12, 3
  r = dcal.num_selected(n - 1, 0.1)  # 78 local queries

  def glca(queries):  # fused qkv over all tokens; attention, proj and MLP on the query rows
    return (2 * n * d * 3 * d + queries * (2 * 2 * n * d + 2 * d * d + 2 * 2 * d * m)
            + 2 * d * c)
  glca_cls = f['dcal_cls'] - f['sa_vit']
  assert 1.0 < glca_cls / glca(1) < 1.03, glca_cls / glca(1)  # measured 1.009
  # 'mean': CLS + R query rows, the head-mean maps of the L-1 blocks and the rollout alone
  glca_mean = f['dcal_mean'] - f['sa_vit']
  want = glca(1 + r) + (layers - 1) * heads * n * n + f['rollout_vector']
  assert 1.0 < glca_mean / want < 1.03, glca_mean / want  # measured 1.011
  assert 0.005 < glca_cls / f['sa_vit'] < glca_mean / f['sa_vit'] < 0.03
  # the vector rollout: its (L-2) vector-matrix products plus forming each S̄ (a few flops per
  # element); the running product: (L-3)·785³ multiply-adds, within 2 %
  assert abs(f['rollout_running_product'] / f['rollout_running_product_analytic'] - 1) < 0.02
  forming = (layers - 1) * n * n
  assert (f['rollout_vector_analytic'] + 2 * forming < f['rollout_vector']
          < f['rollout_vector_analytic'] + 8 * forming < 0.1e9)
  assert f['dcal_mean_running_product'] - f['dcal_mean'] == pytest.approx(
      f['rollout_running_product'] - f['rollout_vector'], rel=0.02)
  # GLCA off: nothing of the selection runs, DCAL costs what the plain ViT costs
  assert abs(f['dcal_no_glca'] / f['sa_vit'] - 1) < 0.001


# --- losses and gradients ----------------------------------------------------------------------
def _branch_grads(params, model, x, labels, partner):
  """d CE_b / d params for each branch b (one jitted Jacobian of the three CEs)."""
  def ces(p):
    out = model.apply({'params': p}, x, partner=partner)
    return jnp.stack([losses.cross_entropy(out[f'{b}_logits'], labels) for b in dcal.BRANCHES])
  jac = jax.jit(jax.jacrev(ces))(params)
  return {b: jax.tree_util.tree_map(lambda a, i=i: a[i], jac) for i, b in enumerate(dcal.BRANCHES)}


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(tree)))


def test_each_branch_loss_moves_its_own_parameters():
  model = make_model()
  params = init_params(model)
  x, labels = images(), jnp.array([0, 1, 2, 3])
  g = _branch_grads(params, model, x, labels, jnp.array([1, 2, 3, 0]))
  last = f'block_{TINY.depth - 1}'
  # GLCA CE: its own block/norm/head, and the shared blocks feeding its input
  for k in ('glca_block', 'glca_norm', 'glca_head', 'block_0', 'embed'):
    assert _norm(g['glca'][k]) > 0, k
  # GLCA sits parallel to the last SA block and the rollout carries no gradient
  assert _norm(g['glca'][last]) == 0 and _norm(g['glca']['head']) == 0
  # PWCA CE: the shared blocks and the shared head, never GLCA
  for k in ('block_0', last, 'head', 'norm', 'embed'):
    assert _norm(g['pwca'][k]) > 0, k
  for k in ('glca_block', 'glca_head', 'glca_norm'):
    assert _norm(g['pwca'][k]) == 0, k
    assert _norm(g['sa'][k]) == 0, k
  # PWCA's gradient w.r.t. the shared weights is not SA's
  assert not np.allclose(g['pwca']['block_0']['attn']['qkv']['kernel'],
                         g['sa']['block_0']['attn']['qkv']['kernel'])


def test_uncertainty_weight_gradients_are_analytic():
  model = make_model()
  params = dict(init_params(model))
  w = jnp.array([0.3, -0.4, 0.7])
  params['loss_weights'] = w
  x, labels = images(), jnp.array([0, 1, 2, 3])
  partner = jnp.array([1, 2, 3, 0])

  def loss(p):
    return losses.dcal_loss(model.apply({'params': p}, x, partner=partner), labels)

  (total, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  ce = np.array([metrics[f'ce_{b}'] for b in dcal.BRANCHES], np.float64)
  w64 = np.asarray(w, np.float64)
  np.testing.assert_allclose(grads['loss_weights'], 0.5 * (1 - np.exp(-w64) * ce), rtol=1e-5)
  np.testing.assert_allclose(total, 0.5 * np.sum(np.exp(-w64) * ce + w64), rtol=1e-5)
  # CE_b against an independent log-softmax
  out = japply(model, params, x, partner)
  for b, c in zip(dcal.BRANCHES, ce):
    z = np.asarray(out[f'{b}_logits'], np.float64)
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    np.testing.assert_allclose(c, -logp[np.arange(B), np.asarray(labels)].mean(), rtol=1e-5)


# --- inference / remat / tracing ---------------------------------------------------------------
def test_inference_output_independent_of_num_pwca_layers():
  x = images()
  params = init_params(make_model())
  outs = [japply(make_model(num_pwca_layers=t), params, x) for t in (TINY.depth, 1, 0)]
  for o in outs[1:]:
    assert o.keys() == outs[0].keys()
    for k in o:
      np.testing.assert_array_equal(o[k], outs[0][k])
  # train=False with a partner still leaves SA/GLCA untouched
  o = japply(make_model(), params, x, jnp.array([1, 0, 3, 2]))
  np.testing.assert_array_equal(o['sa_logits'], outs[0]['sa_logits'])
  np.testing.assert_array_equal(o['glca_logits'], outs[0]['glca_logits'])


def _remat_grads(policy):
  cfg = vit.ViTConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
  x, labels = images(), jnp.array([0, 1, 2, 3])
  params = init_params(make_model(cfg))
  model = make_model(cfg, remat_policy=policy, stochastic_depth_prob=0.2)

  def loss(p):
    partner = dcal.derangement(jax.random.PRNGKey(5), B)
    out = model.apply({'params': p}, x, train=True, partner=partner,
                      rngs={'dropout': jax.random.PRNGKey(11)})
    return losses.dcal_loss(out, labels)[0]
  return jax.jit(jax.value_and_grad(loss))(params)


_no_remat_grads = functools.cache(lambda: _remat_grads(None))


# The config's default policy in the quick set; the other names take the same code path
# (jax.checkpoint with the named policy) and run with `slow`.
@pytest.mark.parametrize('policy', [
    'nothing_saveable',
    *(pytest.param(p, marks=pytest.mark.slow)
      for p in ('full', 'dots_saveable', 'dots_with_no_batch_dims_saveable'))])
def test_remat_policies_give_the_same_gradients(policy):
  ref_loss, ref = _no_remat_grads()
  l, g = _remat_grads(policy)
  np.testing.assert_allclose(l, ref_loss, rtol=1e-6)
  chex.assert_trees_all_close(g, ref, rtol=1e-4, atol=1e-6)
  assert _norm(ref['glca_block']) > 0


def test_train_loss_traces_once():
  model = make_model(stochastic_depth_prob=0.1)
  params = init_params(model)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, x, labels, key):
    k1, k2 = jax.random.split(key)
    partner = dcal.derangement(k1, x.shape[0])

    def loss(p):
      out = model.apply({'params': p}, x, train=True, partner=partner, rngs={'dropout': k2})
      return losses.dcal_loss(out, labels)[0]
    return jax.value_and_grad(loss)(params)

  for i in range(4):
    l, g = step(params, images(seed=i), jnp.array([i % NC, 1, 2, 3]), jax.random.PRNGKey(i))
    params = jax.tree_util.tree_map(lambda p, d: p - 1e-3 * d, params, g)
    assert np.isfinite(float(l))


# --- build_model / heads -----------------------------------------------------------------------
def _config(**kw):
  from dca_jax import config_lib
  c = config_lib.base_config()
  c.num_classes = NC
  c.backbone_overrides = dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=8)
  c.num_sa_layers = c.num_pwca_layers = 3
  for k, v in kw.items():
    c[k] = v
  return c


def _init_abstract(model):
  x = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, partner=jnp.array([1, 0])), x)


def test_build_model_builds_the_configured_model():
  model = build_model(_config(use_gradient_checkpointing=True, remat_policy='dots_saveable'))
  assert model.config.depth == 3 and model.config.width == 32
  assert model.remat_policy == 'dots_saveable' and model.num_pwca_layers == 3
  assert build_model(_config(use_gradient_checkpointing=False)).remat_policy is None
  _init_abstract(model)


@pytest.mark.parametrize('overrides', [dict(num_sa_layers=12), dict(num_sa_layers=2)])
def test_build_model_rejects_num_sa_layers_not_depth(overrides):
  with pytest.raises(ValueError, match='num_sa_layers'):
    build_model(_config(**overrides))


@pytest.mark.parametrize('overrides,match', [
    (dict(num_glca_layers=2), 'num_glca_layers'),
    (dict(num_glca_layers=-1), 'num_glca_layers'),
    (dict(num_pwca_layers=4), 'num_pwca_layers'),
    (dict(num_pwca_layers=-1), 'num_pwca_layers'),
])
def test_build_model_rejects_bad_branch_layers(overrides, match):
  with pytest.raises(ValueError, match=match):
    _init_abstract(build_model(_config(**overrides)))


def test_num_glca_layers_zero_disables_glca():
  model = build_model(_config(num_glca_layers=0))
  params = _init_abstract(model)['params']
  assert not any(k.startswith('glca') for k in params)


def test_predict_probs_and_reid_feature():
  model = make_model()
  params = init_params(model)
  out = japply(model, params, images())
  probs = np.asarray(dcal.predict_probs(out), np.float64)
  sm = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
  want = sm(np.asarray(out['sa_logits'], np.float64)) + sm(np.asarray(out['glca_logits'], np.float64))
  np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(probs.sum(1), 2.0, rtol=1e-5)
  feat = dcal.reid_feature(out)
  assert feat.shape == (B, 2 * TINY.width)
  np.testing.assert_array_equal(feat[:, :TINY.width], out['sa_feature'])
  np.testing.assert_array_equal(feat[:, TINY.width:], out['glca_feature'])
  sa_only = {k: v for k, v in out.items() if not k.startswith('glca')}
  np.testing.assert_allclose(dcal.predict_probs(sa_only), sm(np.asarray(out['sa_logits'])), rtol=1e-5)
  assert dcal.reid_feature(sa_only).shape == (B, TINY.width)


def test_gelu_exact_matches_erf_gelu_and_its_derivative():
  """vit.gelu_exact (hand-written JVP, for speed) against scipy's erf and a float64 derivative."""
  from scipy.special import erf
  x = np.linspace(-8, 8, 2001).astype(np.float32)
  ref = 0.5 * x.astype(np.float64) * (1 + erf(x / np.sqrt(2.0)))
  np.testing.assert_allclose(vit.gelu_exact(jnp.asarray(x)), ref, atol=1e-6, rtol=1e-6)
  grad = jax.vmap(jax.grad(vit.gelu_exact))(jnp.asarray(x))
  xd = x.astype(np.float64)
  dref = 0.5 * (1 + erf(xd / np.sqrt(2.0))) + xd * np.exp(-0.5 * xd * xd) / np.sqrt(2 * np.pi)
  np.testing.assert_allclose(grad, dref, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(lambda v: vit.gelu_exact(v).sum())(jnp.asarray(x)),
                             jax.grad(lambda v: nn.gelu(v, approximate=False).sum())(jnp.asarray(x)),
                             atol=1e-6)


def _pk_labels(p, k, rng):
  """A P x K batch as the sampler lays it out: each identity's K images side by side."""
  return np.repeat(rng.choice(1000, size=p, replace=False), k).astype(np.int32)


@pytest.mark.parametrize('groups', [1, 8])
def test_reid_partners_have_another_identity_and_stay_in_their_group(groups):
  rng = np.random.default_rng(0)
  draw = jax.jit(lambda key, labels: dcal.other_label_partners(key, labels, groups))
  for seed in range(20):
    labels = _pk_labels(16, 4, rng)  # batch 64 = 16 identities x 4 (the paper's Re-ID batch)
    partner = np.asarray(draw(jax.random.key(seed), labels))
    size = 64 // groups
    partner = partner.reshape(groups, size)
    grouped = labels.reshape(groups, size)
    for g in range(groups):
      assert np.all((partner[g] >= 0) & (partner[g] < size))
      assert np.all(grouped[g][partner[g]] != grouped[g])   # never the same identity


def test_plain_derangement_pairs_same_identity_often_and_other_label_never():
  """The reason for the rule: 8 images per device (2 identities x 4) give a same-identity
  partner with probability 3/7 under a derangement of the device's share."""
  rng = np.random.default_rng(1)
  same_plain, same_other, total = 0, 0, 0
  plain_draw = jax.jit(lambda key: dcal.derangement_per_group(key, 64, 8))
  other_draw = jax.jit(lambda key, labels: dcal.other_label_partners(key, labels, 8))
  for seed in range(200):
    labels = _pk_labels(16, 4, rng).reshape(8, 8)
    plain = np.asarray(plain_draw(jax.random.key(seed)))
    other = np.asarray(other_draw(jax.random.key(seed), labels.reshape(-1)))
    for g in range(8):
      same_plain += int(np.sum(labels[g][plain[g]] == labels[g]))
      same_other += int(np.sum(labels[g][other[g]] == labels[g]))
      total += 8
  assert same_plain / total == pytest.approx(3 / 7, abs=0.03)
  assert same_other == 0


def test_other_label_partners_are_uniform_over_the_other_identities():
  labels = np.array([0, 0, 1, 1, 2, 2], np.int32)
  counts = np.zeros((6, 6))
  draw = jax.jit(jax.vmap(lambda key: dcal.other_label_partners(key, labels, 1)))
  for p in np.asarray(draw(jax.random.split(jax.random.key(0), 3000))):
    counts[np.arange(6), p] += 1
  allowed = labels[:, None] != labels[None, :]
  assert np.all(counts[~allowed] == 0)
  freq = counts[allowed].reshape(6, 4) / 3000
  np.testing.assert_allclose(freq, 0.25, atol=0.04)


def test_a_group_of_one_identity_falls_back_to_a_derangement():
  labels = np.array([5, 5, 5, 5, 1, 2, 3, 4], np.int32)
  p = np.asarray(dcal.other_label_partners(jax.random.key(3), labels, 2)).reshape(2, 4)
  assert np.all(p[0] != np.arange(4))                # no self-pairs
  assert sorted(p[0]) == [0, 1, 2, 3]                 # a permutation of the group
  assert np.all(labels[4:][p[1]] != labels[4:])


@pytest.mark.parametrize('stop', [False, True])
def test_partner_stop_gradient_cuts_the_gradient_into_the_partner(stop):
  """With T = L the PWCA stream of image 0 starts from image 0 itself; image 1 reaches it only
  through the partner keys/values, so d(PWCA logits of image 0)/d(image 1) is zero exactly when
  `pwca_partner_stop_gradient` is set."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top

  from dca_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = tiny_config(pwca_partner_stop_gradient=stop)
  model = build_model(config)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  # jitted: one compile, not one per primitive
  variables = jax.jit(lambda x: model.init({'params': jax.random.key(0)}, x, train=False))(images)
  partner = jnp.array([1, 0], jnp.int32)

  def pwca_of_image0(images):
    out = model.apply(variables, images, train=True, partner=partner,
                      rngs={'dropout': jax.random.key(1), 'selection': jax.random.key(2)})
    return out['pwca_logits'][0].sum()

  grad = np.asarray(jax.jit(jax.grad(pwca_of_image0))(images))
  assert np.abs(grad[0]).max() > 0
  assert (np.abs(grad[1]).max() == 0) == stop
