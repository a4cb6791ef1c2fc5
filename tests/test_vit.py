"""The backbone's own layers against Flax's: the hand-written LayerNorm backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dca_jax.models import vit


def test_layer_norm_values_and_gradients_equal_flax_layer_norm():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16)) * 3.0 + 1.0
  ours, theirs = vit.LayerNorm(), nn.LayerNorm(epsilon=vit.LN_EPS, dtype=jnp.float32)
  params = ours.init(jax.random.PRNGKey(1), x)
  # Non-trivial scale and bias, the same for both (same parameter names and shapes).
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  assert jax.tree.structure(params) == jax.tree.structure(theirs.init(jax.random.PRNGKey(1), x))
  weights = jax.random.normal(jax.random.PRNGKey(3), x.shape)  # a loss that weights every output

  def loss(module):
    return lambda p, inputs: jnp.sum(module.apply(p, inputs) * weights)

  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-5)
  (gp_ours, gx_ours) = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  (gp_theirs, gx_theirs) = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(gx_ours, gx_theirs, atol=1e-4, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(gp_ours), jax.tree.leaves(gp_theirs)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
