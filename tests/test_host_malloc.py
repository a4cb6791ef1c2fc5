"""glibc malloc keeping freed memory (dca_jax.host_malloc): 256 MiB (and 2.25 GiB) malloc'd,
written and freed four (two) times faults its pages in once, not at every round (in the main thread with the `keep`
settings; in a pool thread only with one arena as well); opted out, or on an accelerator host,
it faults every round as glibc does by default. Which configs get one arena, and that
config_files.prepare tunes the host only for a checked config, before numpy or jax is loaded."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

PROBE = r"""
import ctypes, json, os, resource, threading
from dca_jax import host_malloc
applied = host_malloc.retain_freed_memory(one_arena=os.environ['ONE_ARENA'] == '1')
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
size, n = int(os.environ.get('SIZE_MB', 256)) << 20, int(os.environ.get('ROUNDS', 4))

def rounds():   # in a thread: its own arena unless the arena limit holds
  for _ in range(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

if os.environ['IN_THREAD'] == '1':
  t = threading.Thread(target=rounds)
  t.start(); t.join()
else:
  rounds()
print(json.dumps({'applied': applied, 'faults': faults}))
"""

PAGES = (256 << 20) // 4096


def _probe(one_arena=True, in_thread=True, **env):
  run_env = {k: v for k, v in subprocess_env().items()
             if not k.startswith(('MALLOC_', 'DCA_JAX_MALLOC'))}   # only what the test sets
  run_env.update(env, ONE_ARENA=str(int(one_arena)), IN_THREAD=str(int(in_thread)))
  out = subprocess.run([sys.executable, '-c', PROBE], cwd=ROOT, env=run_env,
                       capture_output=True, text=True, check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')


@pytest.mark.parametrize('one_arena,in_thread,settings', [
    (True, True, ['keep', 'one_arena']), (False, False, ['keep'])])
def test_freed_memory_stays_mapped_on_a_cpu_host(one_arena, in_thread, settings):
  got = _probe(one_arena, in_thread, JAX_PLATFORMS='cpu')
  assert got['applied'] == settings
  assert got['faults'][0] > 0.9 * PAGES        # the first round maps the pages
  assert max(got['faults'][1:]) < 0.01 * PAGES  # later rounds reuse them


def test_a_block_over_2_gib_stays_mapped_too():
  """DCAL's DeiT-T 448 px step takes a 2.4 GiB buffer: a finite trim threshold (at most 2 GiB,
  mallopt takes an int) handed it back and faulted it in again at every step."""
  got = _probe(JAX_PLATFORMS='cpu', SIZE_MB='2304', ROUNDS='2')
  pages = (2304 << 20) // 4096
  assert got['faults'][0] > 0.9 * pages and got['faults'][1] < 0.01 * pages, got


def test_a_pool_thread_without_one_arena_maps_large_blocks_afresh():
  got = _probe(one_arena=False, in_thread=True, JAX_PLATFORMS='cpu')
  assert got['applied'] == ['keep']
  assert min(got['faults']) > 0.9 * PAGES       # its own arena mmaps a 256 MiB block each time


@pytest.mark.parametrize('env', [{'DCA_JAX_MALLOC': 'default'}, {'JAX_PLATFORMS': 'cuda'},
                                 {'MALLOC_ARENA_MAX': '4'}])
def test_left_alone_when_opted_out_on_accelerators_or_set_by_the_user(env):
  got = _probe(**env)
  assert got['applied'] == []
  assert min(got['faults']) > 0.9 * PAGES       # glibc's default: a fresh mmap each round


def test_one_arena_for_large_steps_only():
  from dca_jax import config_lib, host_malloc  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  cub = config_lib.base_config()   # DeiT-T, 448 px, batch 4: 4 x 785 x 192 x 12
  assert config_lib.activation_elements(cub) == 4 * 785 * 192 * 12
  assert host_malloc.one_arena_pays(config_lib.activation_elements(cub))
  assert not host_malloc.one_arena_pays(config_lib.activation_elements(tiny_config()))


PREPARE = r"""
import json, sys
from dca_jax import config_files, config_lib, host_malloc
seen = []
def spy(one_arena=False):   # what was loaded when the settings were applied
  seen.append({'one_arena': one_arena, 'numpy': 'numpy' in sys.modules, 'jax': 'jax' in sys.modules})
  return ()
host_malloc.retain_freed_memory = spy
config = config_lib.base_config()   # DeiT-T 448 px batch 4: one arena pays
config.update(json.loads(sys.argv[1]))
try:
  config_files.prepare(config)
  error = ''
except config_lib.ConfigError as e:
  error = str(e)
print(json.dumps({'seen': seen, 'error': error, 'jax_then': 'jax' in sys.modules}))
"""


@pytest.mark.parametrize('knobs,error,tuned', [
    ({}, '', True),
    ({'backbone': 'vit_huge'}, "config.backbone='vit_huge' is not one of", False),
    ({'input_size': -32}, 'config.input_size=-32 is out of its range', False),
    ({'remat_policy': 'bogus'}, "config.remat_policy='bogus' is not 'full'", True),  # asks jax
])
def test_prepare_tunes_the_host_for_a_checked_config_before_numpy_and_jax_load(knobs, error,
                                                                               tuned):
  """The knobs the tuning reads are checked first (a bad one: one line, the host left alone),
  the settings applied before numpy or jax is imported, then the whole check runs (the remat
  policy, which asks jax, among it)."""
  r = subprocess.run([sys.executable, '-c', PREPARE, json.dumps(knobs)], cwd=ROOT,
                     env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got['error'].startswith(error) and bool(got['error']) == bool(error), got
  assert got['seen'] == ([{'one_arena': True, 'numpy': False, 'jax': False}] if tuned else [])
  assert got['jax_then'] == tuned   # the whole check ran after the tuning, or never
