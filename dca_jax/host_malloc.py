"""glibc malloc told to keep the memory it frees, for training on the CPU.

Two settings, both set with `mallopt` before jax or TensorFlow is imported (main.py through
`config_files.prepare`, once the knobs read here are checked; the benchmarks):

- No mmap, no trimming, a 256 MiB top pad (always, on CPU hosts): blocks freed
  after a step stay in the heap for the next one. The demo (56 px, batch 32), 186 steps on 2
  Zen 1 cores: 75 s wall, 104 s user, 0.3 M page faults, against 91-102 s, 125-142 s and 3.1 M
  with glibc's defaults.
- One arena for every thread (`one_arena`, for large steps): XLA:CPU allocates each execution's
  temporary buffer (about 1 GiB for a DeiT-T 448 px batch-4 train step) with posix_memalign on a
  pool thread, and a thread with an arena of its own maps a block over 64 MiB afresh whatever
  M_MMAP_MAX says, so every page faults and is zeroed again at every step (~290k faults per
  step; with one arena: none, the step 1.21x faster). Small steps lose by it (the demo: 115 s
  instead of 75 s: the input pipeline's threads and XLA's contend for the one arena), so it is
  set only when a physical batch's activations reach ONE_ARENA_MIN_ELEMENTS. The arena limit
  binds only threads that have not allocated yet: XLA's pool threads start with jax's CPU
  backend, not at import (after `import dca_jax.checks` malloc_info shows the one arena on a
  2-core host); importing numpy starts OpenBLAS's threads, though, so before it to be safe.

Left alone: hosts with an accelerator (their input threads keep their own arenas), systems
without glibc, a process started with any MALLOC_* variable, and DCA_JAX_MALLOC=default.
DCA_JAX_MALLOC=retain applies both settings everywhere.
"""

import ctypes
import ctypes.util
import glob
import os

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
# trim threshold -1: never trim (mallopt(3)); a finite one is at most 2 GiB (an int), below the
# DCAL step's 2.4 GiB buffer, which was then handed back and faulted in again every step
KEEP = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 256 * 2**20))
ONE_ARENA = ((M_ARENA_MAX, 1),)
# batch x tokens x width x depth of one physical batch: DeiT-T 448 px batch 4 is 7.2 M (its
# temporary buffer 1 GiB), the demo 0.3 M (a few MiB)
ONE_ARENA_MIN_ELEMENTS = 2**22
ENV = 'DCA_JAX_MALLOC'   # auto (default) | default | retain


def _accelerator_present() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return not platforms.startswith('cpu')
  return bool(glob.glob('/dev/nvidia[0-9]*') or glob.glob('/dev/accel[0-9]*')
              or glob.glob('/dev/vfio/[0-9]*'))


def one_arena_pays(activation_elements: int) -> bool:
  return activation_elements >= ONE_ARENA_MIN_ELEMENTS


def retain_freed_memory(one_arena: bool = False) -> tuple:
  """Applies the settings above where they help; returns the names of those applied."""
  choice = os.environ.get(ENV, 'auto')
  if choice == 'default' or any(k.startswith('MALLOC_') for k in os.environ):
    return ()
  if choice != 'retain' and _accelerator_present():
    return ()
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl and macOS lack it)
  except (OSError, AttributeError, TypeError):
    return ()
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  groups = [('keep', KEEP)]
  if one_arena or choice == 'retain':
    groups.append(('one_arena', ONE_ARENA))
  return tuple(name for name, settings in groups
               if all(mallopt(param, value) == 1 for param, value in settings))
