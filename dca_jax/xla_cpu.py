"""Which library XLA:CPU runs the matrix products with, for the programs dca_jax compiles.

jaxlib 0.10 hands every dot (and some reductions) to YNNPACK by default. On the AVX2 machine
the CPU work is measured on (2-core AMD EPYC, Zen 1), XLA's own Eigen contraction is faster on
this model's shapes: the DeiT-T 448 px SA-only train step 0.77-0.93x the time with YNNPACK in
three paired runs, 0.92-1.00x timm's as shipped (docs/BENCHMARKS.md). So on x86 CPUs with AVX2
and without AVX-512 the jitted train, evaluation and prediction programs are compiled with
YNNPACK's fusions off. Other CPUs (AVX-512 / AMX, ARM) keep XLA's default until a run there
says otherwise (`benchmarks/run_block_parts.sh` times both).

DCA_JAX_CPU_DOTS = auto (the rule above) | eigen | ynnpack (XLA's default). Accelerators are
never touched. A jaxlib that no longer knows the option compiles with its defaults (a warning
says so) instead of failing.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import numpy as np

from dca_jax import errors

ENV = 'DCA_JAX_CPU_DOTS'
CHOICES = ('auto', 'eigen', 'ynnpack')
# an empty list of library fusion kinds: no YNNPACK fusion, dots go to Eigen
EIGEN_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


@functools.cache
def _cpu_flags() -> frozenset:
  """The ISA flags /proc/cpuinfo lists for x86 CPUs (empty elsewhere)."""
  try:
    with open('/proc/cpuinfo') as f:
      return frozenset(next((line for line in f if line.startswith('flags')), '').split())
  except OSError:
    return frozenset()


def dots_library() -> str:
  """'eigen' or 'ynnpack': DCA_JAX_CPU_DOTS, `auto` resolved for this CPU."""
  choice = os.environ.get(ENV, 'auto')
  if choice not in CHOICES:
    raise errors.ConfigError(f'{ENV}={choice!r}: expected one of {", ".join(CHOICES)}')
  if choice == 'auto':
    flags = _cpu_flags()
    return 'eigen' if 'avx2' in flags and 'avx512f' not in flags else 'ynnpack'
  return choice


@functools.cache
def _accepted(options: tuple) -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f'{ENV}: this jaxlib does not take {dict(options)} ({type(e).__name__}); '
                  'its CPU defaults are used', RuntimeWarning, stacklevel=3)
    return False
  return True


def jit(fn, *, platform: str | None = None, **kwargs):
  """`jax.jit(fn, **kwargs)` compiled with this module's options for `platform`."""
  return jax.jit(fn, compiler_options=compiler_options(platform), **kwargs)


def compiler_options(platform: str | None = None) -> dict | None:
  """`jax.jit(..., compiler_options=...)` for a program on `platform` (default: JAX's
  backend): Eigen's dots on the CPU where they pay (module docstring), else None."""
  platform = platform or jax.default_backend()
  if platform != 'cpu' or dots_library() != 'eigen':
    return None
  options = tuple(sorted(EIGEN_OPTIONS.items()))
  return dict(options) if _accepted(options) else None
