"""glibc malloc keeping freed memory (dca_jax.host_malloc): a thread that mallocs, writes and
frees 256 MiB four times faults its pages in once, not at every round; opted out, or on an
accelerator host, it faults every round as glibc does by default."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

PROBE = r"""
import ctypes, json, resource, threading
from dca_jax import host_malloc
applied = host_malloc.retain_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []

def rounds():   # in a thread: its own arena unless the arena limit holds
  for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(256 << 20)
    ctypes.memset(p, 1, 256 << 20)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

t = threading.Thread(target=rounds)
t.start(); t.join()
print(json.dumps({'applied': applied, 'faults': faults}))
"""

PAGES = (256 << 20) // 4096


def _probe(**env):
  clean = {k: v for k, v in os.environ.items() if not k.startswith(('MALLOC_', 'DCA_JAX_MALLOC'))}
  clean.pop('JAX_PLATFORMS', None)
  out = subprocess.run([sys.executable, '-c', PROBE], cwd=ROOT, env={**clean, **env},
                       capture_output=True, text=True, check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')


def test_freed_memory_stays_mapped_on_a_cpu_host():
  got = _probe(JAX_PLATFORMS='cpu')
  assert got['applied']
  assert got['faults'][0] > 0.9 * PAGES        # the first round maps the pages
  assert max(got['faults'][1:]) < 0.01 * PAGES  # later rounds reuse them


@pytest.mark.parametrize('env', [{'DCA_JAX_MALLOC': 'default'}, {'JAX_PLATFORMS': 'cuda'},
                                 {'MALLOC_ARENA_MAX': '4'}])
def test_left_alone_when_opted_out_on_accelerators_or_set_by_the_user(env):
  got = _probe(**env)
  assert not got['applied']
  assert min(got['faults']) > 0.9 * PAGES       # glibc's default: a fresh mmap each round
