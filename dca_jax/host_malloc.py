"""glibc malloc told to keep the memory it frees, for training on the CPU.

XLA:CPU allocates each execution's temporary buffer (about 1 GiB for a DeiT-T 448 px batch-4
train step) with posix_memalign. glibc serves a request that large with a fresh mmap, and a
thread with an arena of its own does so whatever M_MMAP_MAX says, so every page of the buffer
faults and is zeroed again at every step (~270k minor faults per step). One arena, no mmap and
no trimming below 2 GiB keep the pages mapped, as `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=256MiB` would at process start. The arena limit binds
only threads that have not allocated yet, so this runs before jax or TensorFlow is imported
(main.py calls it first). The price: the process keeps the most it once used (peak RSS +35 %
for that step).

Left alone: hosts with an accelerator (their input threads keep their own arenas), systems
without glibc, a process started with any MALLOC_* variable, and DCA_JAX_MALLOC=default
(DCA_JAX_MALLOC=retain applies it on accelerator hosts too).
"""

import ctypes
import ctypes.util
import glob
import os

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1),
            (M_TOP_PAD, 256 * 2**20))
ENV = 'DCA_JAX_MALLOC'   # auto (default) | default | retain


def _accelerator_present() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return not platforms.startswith('cpu')
  return bool(glob.glob('/dev/nvidia[0-9]*') or glob.glob('/dev/accel[0-9]*')
              or glob.glob('/dev/vfio/[0-9]*'))


def retain_freed_memory() -> bool:
  """Applies the settings above where they help; True when applied."""
  choice = os.environ.get(ENV, 'auto')
  if choice == 'default' or any(k.startswith('MALLOC_') for k in os.environ):
    return False
  if choice != 'retain' and _accelerator_present():
    return False
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl and macOS lack it)
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in SETTINGS)
