"""dca_jax/xla_cpu.py: which library XLA:CPU runs the dots with, and that the choice reaches
the compiled program without changing its results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax import xla_cpu
from dca_jax.errors import ConfigError
from dca_jax.models import vit


@pytest.mark.parametrize('flags, want', [
    ({'fma', 'avx2'}, 'eigen'), ({'avx2', 'avx512f', 'amx_tile'}, 'ynnpack'), (set(), 'ynnpack')])
def test_auto_picks_eigen_on_avx2_without_avx512_only(monkeypatch, flags, want):
  monkeypatch.delenv(xla_cpu.ENV, raising=False)
  monkeypatch.setattr(xla_cpu, '_cpu_flags', lambda: flags)
  assert xla_cpu.dots_library() == want


@pytest.mark.parametrize('choice', ['eigen', 'ynnpack'])
def test_the_env_overrides_auto(monkeypatch, choice):
  monkeypatch.setenv(xla_cpu.ENV, choice)
  monkeypatch.setattr(xla_cpu, '_cpu_flags', lambda: {'avx2', 'avx512f'} if choice == 'eigen' else {'avx2'})
  assert xla_cpu.dots_library() == choice


def test_a_wrong_value_is_one_clear_line(monkeypatch):
  monkeypatch.setenv(xla_cpu.ENV, 'mkl')
  with pytest.raises(ConfigError, match=r"DCA_JAX_CPU_DOTS='mkl': expected one of auto, eigen"):
    xla_cpu.dots_library()


def test_options_only_for_the_cpu_and_eigen(monkeypatch):
  monkeypatch.setenv(xla_cpu.ENV, 'eigen')
  assert xla_cpu.compiler_options('cpu') == xla_cpu.EIGEN_OPTIONS
  assert xla_cpu.compiler_options('cuda') is None
  assert xla_cpu.compiler_options('tpu') is None
  monkeypatch.setenv(xla_cpu.ENV, 'ynnpack')
  assert xla_cpu.compiler_options('cpu') is None


def test_an_unknown_option_falls_back_with_a_warning():
  with pytest.warns(RuntimeWarning, match='does not take'):
    assert not xla_cpu._accepted((('xla_cpu_no_such_option', ''),))  # pylint: disable=protected-access


def test_eigen_dots_reach_the_program_and_agree_with_ynnpack(monkeypatch):
  """The block's gradients compiled both ways: YNNPACK fusions only without the options, the
  same numbers (fp32; summation order differs) either way."""
  monkeypatch.setenv(xla_cpu.ENV, 'eigen')
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 17, 32)), jnp.float32)
  block = vit.EncoderBlock(width=32, num_heads=2, mlp_dim=64)
  params = block.init(jax.random.key(0), x)
  grads = lambda p, x: jax.grad(lambda p, x: block.apply(p, x)[0].sum(), argnums=(0, 1))(p, x)
  compiled = {name: jax.jit(grads, compiler_options=opts).lower(params, x).compile()
              for name, opts in (('ynnpack', None), ('eigen', xla_cpu.compiler_options('cpu')))}
  assert compiled['eigen'].as_text().count('__ynn_fusion') == 0
  assert compiled['ynnpack'].as_text().count('__ynn_fusion') > 0
  want, got = (jax.tree.leaves(compiled[k](params, x)) for k in ('ynnpack', 'eigen'))
  for a, b in zip(want, got):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5)
