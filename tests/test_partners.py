"""PWCA partners: Re-ID batches pair images of different identities (dca_jax.models.dcal)."""

import jax
import numpy as np
import pytest

from dca_jax.models import dcal


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
  variables = model.init({'params': jax.random.key(0)}, images, train=False)
  partner = jnp.array([1, 0], jnp.int32)

  def pwca_of_image0(images):
    out = model.apply(variables, images, train=True, partner=partner,
                      rngs={'dropout': jax.random.key(1), 'selection': jax.random.key(2)})
    return out['pwca_logits'][0].sum()

  grad = np.asarray(jax.grad(pwca_of_image0)(images))
  assert np.abs(grad[0]).max() > 0
  assert (np.abs(grad[1]).max() == 0) == stop
