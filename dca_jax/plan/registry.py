"""The target registry: `--target_config` values into targets.

  tpu:v5e:2x2                       a Cloud TPU topology (tpu.py; any name libtpu accepts)
  .../specs/h100_sxm.txtpb          an XLA GPU target spec (gpu.py; `--topology 1x1x8`: 8 GPUs)
  (none)                            the attached devices (their allocator's limit, else the RAM)

Several values plan several targets in one call.
"""

from __future__ import annotations

from typing import Sequence

import jax

from dca_jax.plan import gpu, tpu
from dca_jax.plan.targets import GIB, Target

TPU_PREFIX = 'tpu:'


def attached_target(memory_gb: float = 0.0) -> Target:
  """The devices this process sees. Memory: `memory_gb` when set, else the allocator's limit
  (GPU/TPU), else the host's RAM (CPU)."""
  devices = tuple(jax.devices())
  try:
    stats = devices[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (CPU backends may not implement it)
    stats = {}
  physical = int(stats.get('bytes_limit', 0))
  if not physical:
    import psutil  # pylint: disable=g-import-not-at-top
    physical = int(psutil.virtual_memory().total)
  memory = int(memory_gb * GIB) if memory_gb else physical
  platform = jax.default_backend()
  peak = tpu.attached_peak(devices[0].device_kind) if platform == 'tpu' else {}
  return Target(name=devices[0].device_kind, backend=platform, platform=platform,
                devices=devices, memory_bytes=memory, physical_memory_bytes=physical,
                peak_flops=peak, reports_flops=platform == 'tpu',
                hosts=jax.process_count())


def targets(values: Sequence[str], topology: str = '1x1x1', memory_gb: float = 0.0) -> list:
  """The targets `--target_config` names (see the module doc); none: the attached devices."""
  found = []
  for value in values:
    value = value.strip()
    if value.startswith(TPU_PREFIX):
      found.append(tpu.tpu_target(value[len(TPU_PREFIX):]))
    elif value:
      found.append(gpu.gpu_target(value, topology))
  return found or [attached_target(memory_gb)]
