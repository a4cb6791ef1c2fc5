"""What every benchmark records about the machine it ran on (no jax or torch imports, so the
timm peer's venv can use it too)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
  """The CPU's model name (figures only compare within one machine: name it)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def loadavg() -> float:
  """The 1-minute load average (other jobs' share of the cores), NaN where unknown."""
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return float('nan')


def isa_flags() -> str:
  """avx2 / avx512f / amx_tile, as /proc/cpuinfo lists them (what the matmul library can use)."""
  try:
    with open('/proc/cpuinfo') as f:
      flags = next(line for line in f if line.startswith('flags')).split()
  except (OSError, StopIteration):
    return 'unknown'
  return ' '.join(x for x in ('avx2', 'avx512f', 'avx512_bf16', 'amx_tile') if x in flags)
