"""What the planner compiles for: a target is a set of devices, the memory each may use, the
dense peak FLOP/s per precision, and what its compiled executables can tell.

The registry (`plan.registry`) makes targets from a GPU spec file (gpu.py), a TPU topology
name (tpu.py) or the attached devices; everything platform-specific lives in those entries.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  backend: str                      # 'gpu-deviceless', 'tpu-deviceless', or the attached backend
  platform: str                     # 'gpu' | 'tpu' | 'cpu': what the step is compiled for
  devices: tuple                    # one per data-parallel rank (deviceless: the topology's)
  memory_bytes: int                 # per device: what the train step may use
  physical_memory_bytes: int        # per device, the chip's
  peak_flops: dict                  # precision -> dense matrix FLOP/s per device (may be empty)
  spec: str = ''                    # the spec file or 'tpu:<topology>', for deviceless targets
  reports_flops: bool = False       # compiled cost analysis gives valid FLOPs per device (TPU)
  hosts: int = 1
  # hlo text -> {row field: value} the platform adds to a row (GPU: cuDNN fused attention calls)
  inspect_hlo: Optional[Callable[[str], dict]] = None

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]
