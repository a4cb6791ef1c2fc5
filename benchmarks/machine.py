"""What every benchmark records about the machine it ran on, and how a peer of
benchmarks/peers.py serves (no jax or torch imports, so the timm peer's venv can use it too)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

PREFIX = '@@ '   # a peer's reply lines start with this; the rest of its stdout is ignored


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


def median_seconds(call, repeats: int, warmups: int = 1) -> float:
  """The median wall seconds of `repeats` calls of `call()` after `warmups` untimed ones (the
  compile, the caches)."""
  for _ in range(warmups):
    call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def isa_flags() -> str:
  """avx2 / avx512f / amx_tile, as /proc/cpuinfo lists them (what the matmul library can use)."""
  try:
    with open('/proc/cpuinfo') as f:
      flags = next(line for line in f if line.startswith('flags')).split()
  except (OSError, StopIteration):
    return 'unknown'
  return ' '.join(x for x in ('avx2', 'avx512f', 'avx512_bf16', 'amx_tile') if x in flags)


def reply(record: dict) -> None:
  sys.stdout.write(PREFIX + json.dumps(record) + '\n')
  sys.stdout.flush()


def timed(call) -> dict:
  """Wall seconds, minor page faults, CPU seconds (user, system), peak RSS of one call."""
  r0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  call()
  seconds, r1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
  return {'s': seconds, 'minflt': r1.ru_minflt - r0.ru_minflt, 'user_s': r1.ru_utime - r0.ru_utime,
          'sys_s': r1.ru_stime - r0.ru_stime, 'maxrss_mb': r1.ru_maxrss / 1024}


def serve(ready: dict, calls: dict) -> None:
  """A peer's life after its set-up: the `ready` line, then one of `calls` timed per stdin line
  (`quit` ends); between commands it only waits on stdin."""
  reply(ready)
  for line in sys.stdin:
    name = line.strip()
    if name == 'quit':
      break
    reply({'cmd': name, **timed(calls[name])} if name in calls else
          {'cmd': name, 'error': f'unknown command; known: {", ".join(calls)}'})
