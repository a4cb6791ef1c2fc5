"""One training per workdir: `WORKDIR/train.lock`, held with flock while a training runs.

The file says who holds it (host, PID, start time, command). Liveness is the kernel's flock,
which is released when the holder dies however it dies (kill -9 included), so a lock left by
a killed run is recognised as stale and taken over with a line saying so. Where the filesystem
has no flock (some network filesystems), a lock of this host whose PID is gone is stale; one of
another host is taken as live and the line says how to remove it. Readers (eval, visualize,
predict) never take the lock: they may read while a training writes.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Optional

from dca_jax.errors import LockError  # noqa: F401  (lock.LockError)

LOCK_NAME = 'train.lock'


def _describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')} PID {holder.get('pid', '?')}, started "
          f"{holder.get('started', '?')}")


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True
  return True


class WorkdirLock:
  """An acquired lock; `release()` (or process death) frees it."""

  def __init__(self, path: str, fd: int, stale: Optional[dict]):
    self.path, self._fd, self.stale = path, fd, stale

  def release(self) -> None:
    if self._fd is None:
      return
    try:  # unlink first, then unlock: a waiter that got the old inode re-checks (acquire)
      if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
        os.unlink(self.path)
    except OSError:
      pass
    finally:
      os.close(self._fd)
      self._fd = None
      _HELD.pop(self.path, None)


_HELD: dict[str, WorkdirLock] = {}


def acquire(workdir: str, say=None) -> WorkdirLock:
  """Takes WORKDIR/train.lock or raises LockError naming the live holder.

  Re-entrant within a process (the Trainer of train_and_evaluate takes the lock its caller
  already holds). A stale lock (its holder died) is taken over and `say` given one line."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
  if path in _HELD:
    return _HELD[path]
  for _ in range(10):  # retried only if the file was replaced while we locked it
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    previous = _read(path)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        os.close(fd)
        holder = _read(path) or previous
        raise LockError(
            f'another training is writing to {os.path.dirname(path)} ({_describe(holder)}); '
            'wait for it or stop it, or use another --workdir') from None
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        os.close(fd)
        raise
      # No flock here: decide from the PID (this host) or refuse (another host).
      if previous and previous.get('pid') != os.getpid():
        same_host = previous.get('host') == socket.gethostname()
        if not same_host or _pid_alive(previous.get('pid')):
          os.close(fd)
          raise LockError(
              f'another training may be writing to {os.path.dirname(path)} ({_describe(previous)}'
              f'; this filesystem has no flock); if it is not running, rm {path}') from None
    try:  # the path must still name the file we locked (else its holder released it meanwhile)
      if os.stat(path).st_ino != os.fstat(fd).st_ino:
        os.close(fd)
        continue
    except FileNotFoundError:
      os.close(fd)
      continue
    me = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
          'command': ' '.join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
    os.fsync(fd)
    stale = previous if previous and previous.get('pid') is not None else None
    lock = WorkdirLock(path, fd, stale)
    _HELD[path] = lock
    if say is not None and stale_line(lock):
      say(stale_line(lock))
    return lock
  raise LockError(f'could not take {path}: it keeps being replaced')


def stale_line(lock: WorkdirLock) -> Optional[str]:
  if not lock.stale:
    return None
  return (f'{lock.path}: the lock of a run that is gone ({_describe(lock.stale)}) was stale; '
          'taken over')
