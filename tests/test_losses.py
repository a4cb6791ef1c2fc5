"""Losses against numpy re-derivations: label-smoothed cross-entropy, the batch-hard triplet loss
(soft margin and hinge), and the Re-ID branch losses inside the uncertainty weighting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax import checks, config_lib, losses


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_triplet(features, labels, margin):
  """Hermans et al.: per anchor the farthest positive and the nearest negative, by loops."""
  f = np.asarray(features, np.float64)
  n = len(f)
  dist = np.sqrt(np.maximum(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 1e-12))
  terms, correct = [], []
  for a in range(n):
    pos = [dist[a, p] for p in range(n) if labels[p] == labels[a]]
    neg = [dist[a, q] for q in range(n) if labels[q] != labels[a]]
    if not neg:
      continue
    gap = max(pos) - min(neg)
    terms.append(np.log1p(np.exp(gap)) if margin <= 0 else max(0.0, gap + margin))
    correct.append(gap < 0)
  return np.mean(terms), np.mean(correct)


@pytest.mark.parametrize('eps', [0.0, 0.1, 0.3])
def test_cross_entropy_with_label_smoothing(eps):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 7)) * 3
  labels = rng.integers(0, 7, 6)
  target = np.full((6, 7), eps / 7)
  target[np.arange(6), labels] += 1 - eps
  want = -(target * np_log_softmax(logits)).sum(-1).mean()
  got = losses.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), eps)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('margin', [0.0, 0.3])
def test_batch_hard_triplet_matches_loops(margin):
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(4), 3)          # P = 4 identities x K = 3
  features = rng.normal(size=(12, 8)) + labels[:, None] * 0.5
  loss, acc = losses.batch_hard_triplet(jnp.asarray(features, jnp.float32), jnp.asarray(labels),
                                        margin)
  want_loss, want_acc = np_triplet(features, labels, margin)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(acc, want_acc)


def test_triplet_gradient_is_finite_with_duplicate_features():
  """Identical features (distance 0, e.g. a sampled-twice image) must not give NaN gradients."""
  f = jnp.asarray(np.repeat(np.eye(3, 4), 2, axis=0), jnp.float32)
  labels = jnp.asarray([0, 0, 1, 1, 2, 2])
  grad = jax.grad(lambda x: losses.batch_hard_triplet(x, labels)[0])(f)
  assert np.isfinite(np.asarray(grad)).all()


def test_triplet_ignores_anchors_without_negatives():
  f = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32)
  loss, acc = losses.batch_hard_triplet(f, jnp.zeros(4, jnp.int32))
  assert float(loss) == 0.0 and float(acc) == 0.0


def test_reid_branch_loss_is_ce_plus_triplet_under_uncertainty_weights():
  rng = np.random.default_rng(3)
  labels = np.repeat(np.arange(3), 2)
  w = np.array([0.2, -0.1, 0.4])
  out = {'loss_weights': jnp.asarray(w, jnp.float32)}
  want = 0.0
  for b in ('sa', 'glca', 'pwca'):
    logits, feats = rng.normal(size=(6, 3)), rng.normal(size=(6, 4))
    out[f'{b}_logits'], out[f'{b}_feature'] = jnp.asarray(logits), jnp.asarray(feats)
    ce = -np_log_softmax(logits)[np.arange(6), labels].mean()
    loss_b = ce + np_triplet(feats, labels, 0.0)[0]
    want += 0.5 * (np.exp(-w[('sa', 'glca', 'pwca').index(b)]) * loss_b
                   + w[('sa', 'glca', 'pwca').index(b)])
  total, metrics = losses.dcal_loss(out, jnp.asarray(labels), triplet_margin=0.0)
  np.testing.assert_allclose(total, want, rtol=1e-5)
  assert {'ce_sa', 'triplet_sa', 'triplet_acc_pwca', 'w_glca'} <= set(metrics)
  # FGVC (no triplet): the features are not read
  _, fgvc = losses.dcal_loss(out, jnp.asarray(labels))
  assert not any(k.startswith('triplet') for k in fgvc)


def test_a_registered_term_is_added_by_config_alone():
  """A new term is a function in losses.TERMS named in config.loss_terms: the train step sums it
  into every branch's loss (here a constant 1 per branch: 'sum' weighting adds 3 with 3 branches);
  an unknown name is one ConfigError line."""
  from conftest import tiny_config

  from dca_jax import config_lib, tasks
  rng = np.random.default_rng(0)
  out = {'loss_weights': jnp.zeros(3, jnp.float32)}
  for b in ('sa', 'glca', 'pwca'):
    out[f'{b}_logits'] = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 0, 1])
  losses.TERMS['one'] = lambda outputs, branch, labels, options: (jnp.float32(1.0), {})
  try:
    config = tiny_config(loss_terms='ce,one', loss_weighting='sum')
    checks.checked(config)
    options = tasks.get('fgvc').loss_options(config)
    with_one, _ = losses.dcal_loss(out, labels, 'sum', **options)
    plain, _ = losses.dcal_loss(out, labels, 'sum')
    assert float(with_one) == pytest.approx(float(plain) + 3.0, rel=1e-6)
  finally:
    del losses.TERMS['one']
  with pytest.raises(config_lib.ConfigError, match=r"config.loss_terms='ce,nope'") as e:
    checks.checked(tiny_config(loss_terms='ce,nope'))
  assert '\n' not in str(e.value)
  assert tasks.get('reid').loss_options(tiny_config())['terms'] == 'ce,triplet'


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
    checks.checked(config)
  with pytest.raises(ValueError, match='unknown triplet feature'):
    losses.batch_hard_triplet(jnp.ones((4, 2)), jnp.arange(4), 0.0, 'cosine')
