"""The TPU entry of the target registry: a Cloud TPU topology ('v5e:2x2', 'v4:2x2x1', 'v5p:2x2x1',
'v6e:2x2', multi-host 'v5e:4x4', ...), compiled for without a TPU: `jax[tpu]` (libtpu) in its own
venv, JAX_PLATFORMS=cpu, `jax.experimental.topologies.get_topology_desc(platform='tpu', ...)`.

What is TPU-only lives here:
- libtpu's start-up: without TPU_WORKER_HOSTNAMES and TPU_ACCELERATOR_TYPE a compile-only client
  prints warnings and an `E0000 ... INVALID_ARGUMENT` trace, and a second process loading libtpu
  at once fails on /tmp/libtpu_lockfile unless ALLOW_MULTIPLE_LIBTPU_LOAD=1; they are set (where
  unset) before libtpu loads. The accelerator type named does not change what is compiled.
- HBM per chip: compile-only devices have no `memory_stats()`; the compiler's own "available
  HBM" is read from the one-line error of a compile that cannot fit (a 1 TiB output, ~0.1 s),
  with Google's figures as the fallback (`HBM_GIB`, what that error says for each generation).
- Dense bf16 peak per chip (`PEAK_BF16`, Google's published figures, Cloud TPU documentation's
  system architecture pages for each generation).
- v4 chips are addressed as one device each (`chip_config_name='megacore'`).
- Compiled TPU executables report valid FLOPs per chip (unlike deviceless GPU ones); their
  `optimal_seconds` is not a time (negative for a whole step) and is not used. Near the HBM limit
  the TPU compiler rematerialises on its own instead of failing: a row says so when the chip's
  compiled FLOPs exceed the model's (host-lowered) FLOPs per chip.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp

from dca_jax.errors import PlanError
from dca_jax.plan.targets import GIB, Target, first_line

PEAK_BF16 = {'v4': 275e12, 'v5e': 197e12, 'v5p': 459e12, 'v6e': 918e12}
HBM_GIB = {'v4': 30.75, 'v5e': 15.75, 'v5p': 95.74, 'v6e': 31.25}
_ENV = {'TPU_ACCELERATOR_TYPE': 'v5litepod-4', 'TPU_WORKER_HOSTNAMES': 'localhost',
        'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
_HBM = re.compile(r'exceeds available HBM \(([\d.]+)([KMGT])\)')
_KINDS = (('v5 lite', 'v5e'), ('v5e', 'v5e'), ('v6 lite', 'v6e'), ('v6e', 'v6e'), ('v5p', 'v5p'),
          ('v5', 'v5p'), ('v4', 'v4'))


def generation(name: str) -> str:
  """'v5e' from a topology name ('v5e:2x2', 'v5litepod-16') or a device kind ('TPU v5 lite')."""
  lowered = name.lower().replace('litepod', 'e').replace('tpu ', '')
  for marker, gen in _KINDS:
    if lowered.startswith(marker) or f' {marker}' in f' {lowered}':
      return gen
  raise PlanError(f'{name}: not a TPU generation the planner knows ({", ".join(PEAK_BF16)})')


def quiet_libtpu() -> None:
  """libtpu's settings for a compile-only client on a host without TPUs (set where unset)."""
  for key, value in _ENV.items():
    os.environ.setdefault(key, value)


def available_hbm_bytes(device, gen: str) -> int:
  """The compiler's usable HBM of one chip (from a compile that cannot fit), else the table."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  huge = jax.jit(lambda x: jnp.broadcast_to(x, (1 << 20, 1024, 1024)), out_shardings=sharding)
  try:
    huge.lower(jax.ShapeDtypeStruct((), jnp.uint8, sharding=sharding)).compile()
  except Exception as e:  # pylint: disable=broad-except  (RESOURCE_EXHAUSTED names the limit)
    match = _HBM.search(str(e))
    if match:
      return int(float(match.group(1)) * 1024 ** ' KMGT'.index(match.group(2)))
  return int(HBM_GIB[gen] * GIB)


def tpu_target(topology: str) -> Target:
  """A deviceless Cloud TPU target from a topology name libtpu accepts ('v5e:2x2')."""
  if jax.default_backend() != 'cpu':
    raise PlanError('a deviceless TPU plan compiles on the host: run it with JAX_PLATFORMS=cpu')
  gen = generation(topology)
  quiet_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {'chip_config_name': 'megacore'} if gen == 'v4' else {}
  try:
    topo = topologies.get_topology_desc(platform='tpu', topology_name=topology, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  (no libtpu, a name it does not know)
    raise PlanError(f'cannot compile for TPU {topology}: {first_line(e)} (a deviceless TPU plan '
                    f'needs libtpu: pip install "jax[tpu]=={jax.__version__}" in its own venv)'
                    ) from None
  devices = tuple(topo.devices)
  hosts = len({getattr(d, 'process_index', 0) for d in devices})
  hbm = available_hbm_bytes(devices[0], gen)
  name = f'{topology} ({len(devices)} x {devices[0].device_kind}, {hosts} host(s))'
  return Target(name=name, backend='tpu-deviceless', platform='tpu', devices=devices,
                memory_bytes=hbm, physical_memory_bytes=hbm, peak_flops={'bf16': PEAK_BF16[gen]},
                spec=f'tpu:{topology}', reports_flops=True, hosts=hosts)


def attached_peak(device_kind: str) -> dict:
  """{'bf16': peak} of an attached TPU chip, {} when its generation is unknown."""
  try:
    return {'bf16': PEAK_BF16[generation(device_kind)]}
  except PlanError:
    return {}
