"""ResNet-v2 hybrid stem: shapes, names, strides and the weight standardisation.

Numerical parity with timm's ResNetV2 stem is in test_weights.py (tiny hybrid fixture).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax.models import resnet, vit


def test_r50_stem_shapes_and_names():
  m = resnet.ResNetStem(layers=(3, 4, 9))
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))['params']
  out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, 224, 224, 3))), {'params': shapes})
  assert out.shape == (1, 14, 14, 1024)
  assert shapes['conv_root']['kernel'].shape == (7, 7, 3, 64)
  assert set(shapes['gn_root']) == {'scale', 'bias'}
  assert sorted(shapes) == ['block1', 'block2', 'block3', 'conv_root', 'gn_root']
  assert [len(shapes[f'block{s}']) for s in (1, 2, 3)] == [3, 4, 9]
  u = shapes['block2']['unit1']
  assert u['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert u['conv_proj']['kernel'].shape == (1, 1, 256, 512)
  assert 'conv_proj' not in shapes['block2']['unit2']
  n = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes))
  assert n == 11_894_848  # timm vit_base_r50_s16_224 patch_embed.backbone


@pytest.mark.parametrize('size', [224, 448])
def test_hybrid_grid_matches_config(size):
  cfg = vit.get_variant('r50_vit_base')
  assert cfg.stem_stride == 16
  model = vit.VisionTransformer(cfg, num_classes=3)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  assert shapes['params']['embed']['pos_embed'].shape == (1, 1 + cfg.num_patches(size), 768)
  assert shapes['params']['embed']['patch_embed']['kernel'].shape == (1, 1, 1024, 768)


def test_weight_standardisation():
  k = np.random.RandomState(0).randn(3, 3, 4, 5).astype(np.float32) * 3 + 1
  w = np.asarray(resnet.standardize_kernel(jnp.asarray(k)))
  np.testing.assert_allclose(w.reshape(-1, 5).mean(0), 0, atol=1e-6)
  np.testing.assert_allclose(w.reshape(-1, 5).std(0), 1, atol=1e-5)  # biased std, as timm


def test_width_must_fit_groupnorm():
  with pytest.raises(ValueError, match='multiple of 32'):
    resnet.ResNetStem(layers=(1,), width=48).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
