"""The batch-hard triplet's degenerate minimum from scratch, and `triplet_feature`.

issue #25: from a random start, where the nearest negative is closer than the farthest
positive (the camera dominates the features), the raw soft-margin triplet falls fastest by
shrinking every distance, and gradient descent collapses the features onto one point (loss
ln 2, retrieval at chance). `triplet_feature='batch_standardized'` measures distances on
batch-standardised features, which shrinking cannot change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax import config_lib, losses


def _camera_dominated(seed=0, identities=8, per_id=4, dim=16):
  """Features where 2 'cameras' add a large offset and identity a small one: every anchor's
  farthest positive (other camera) is farther than its nearest negative (same camera)."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(identities), per_id)
  cameras = np.tile(np.arange(per_id) % 2, identities)
  camera_offset = rng.normal(0, 3.0, (2, dim))
  identity_offset = rng.normal(0, 0.3, (identities, dim))
  x = camera_offset[cameras] + identity_offset[labels] + rng.normal(0, 0.05, (len(labels), dim))
  return x.astype(np.float32), labels


def _numpy_triplet(f, labels):
  """Reference: soft-margin batch-hard triplet in plain numpy (float64)."""
  f = np.asarray(f, np.float64)
  d = np.sqrt(np.maximum(((f[:, None] - f[None]) ** 2).sum(-1), 1e-12))
  same = labels[:, None] == labels[None]
  d_ap = np.where(same, d, -np.inf).max(1)
  d_an = np.where(same, np.inf, d).min(1)
  return np.mean(np.log1p(np.exp(d_ap - d_an)))


def test_batch_standardized_equals_numpy_reference_and_ignores_scale_and_shift():
  x, labels = _camera_dominated()
  mean, std = x.mean(0), x.std(0)
  reference = _numpy_triplet((x - mean) / np.sqrt(std ** 2 + 1e-5) / np.sqrt(x.shape[1]), labels)
  loss, _ = losses.batch_hard_triplet(jnp.asarray(x), jnp.asarray(labels), 0.0,
                                      'batch_standardized')
  np.testing.assert_allclose(float(loss), reference, rtol=1e-4)
  moved, _ = losses.batch_hard_triplet(jnp.asarray(0.1 * x + 5.0), jnp.asarray(labels), 0.0,
                                       'batch_standardized')
  np.testing.assert_allclose(float(moved), float(loss), rtol=1e-3)
  # The raw loss is the numpy reference on the raw features, and shrinking lowers it.
  raw, _ = losses.batch_hard_triplet(jnp.asarray(x), jnp.asarray(labels))
  np.testing.assert_allclose(float(raw), _numpy_triplet(x, labels), rtol=1e-4)
  shrunk, _ = losses.batch_hard_triplet(jnp.asarray(0.001 * x), jnp.asarray(labels))
  assert float(shrunk) < float(raw) - 1.0 and abs(float(shrunk) - np.log(2)) < 0.05


@pytest.mark.parametrize('feature', ['raw', 'batch_standardized'])
def test_gradient_along_the_feature_scale(feature):
  """d loss(a * f) / d a at a = 1: positive for raw distances from a camera-dominated start
  (scaling every feature down lowers the loss: the pull towards collapse), zero for
  batch-standardised ones."""
  x, labels = _camera_dominated(seed=1)
  scaled = lambda a: losses.batch_hard_triplet(a * jnp.asarray(x), jnp.asarray(labels), 0.0,
                                               feature)[0]  # noqa: E731
  slope = float(jax.grad(scaled)(1.0))
  # the same slope by central differences, as the independent check
  numeric = (float(scaled(1.001)) - float(scaled(0.999))) / 0.002
  np.testing.assert_allclose(slope, numeric, atol=1e-2 + 1e-2 * abs(numeric))
  if feature == 'raw':
    assert slope > 1.0
  else:
    assert abs(slope) < 1e-3


def test_triplet_feature_knob():
  config = config_lib.base_config()
  assert config.triplet_feature == 'raw'  # TransReID / the paper (pretrained)
  config.triplet_feature = 'cosine'
  with pytest.raises(ValueError, match='triplet_feature'):
    config_lib.validate(config)
  with pytest.raises(ValueError, match='unknown triplet feature'):
    losses.batch_hard_triplet(jnp.ones((4, 2)), jnp.arange(4), 0.0, 'cosine')
