"""Sealing a committed checkpoint step: every file fsynced, its size and CRC-32 recorded.

A step is verified against its record before it is restored (`verify_integrity`); a step
without one was not sealed (its save was cut short before the record was written).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Optional

INTEGRITY_FILE = 'dca_integrity.json'   # in each sealed step directory


def _crc_and_size(path: str, buffer: bytearray, sync: bool) -> tuple[int, int]:
  crc, size, view = 0, 0, memoryview(buffer)
  with open(path, 'rb', buffering=0) as f:
    while n := f.readinto(buffer):
      crc = zlib.crc32(view[:n], crc)
      size += n
    if sync:
      os.fsync(f.fileno())
  return crc, size


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_integrity(step_dir: str) -> dict:
  """fsyncs every file of a committed step and records its size and CRC-32 (atomically)."""
  buffer, files = bytearray(1 << 24), {}
  for root, dirs, names in os.walk(step_dir):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(root, name)
      if root == step_dir and name.startswith(INTEGRITY_FILE):
        continue
      crc, size = _crc_and_size(path, buffer, sync=True)
      files[os.path.relpath(path, step_dir)] = [size, crc]
    _fsync_dir(root)
  record = {'format': 1, 'algorithm': 'crc32', 'files': files}
  tmp = os.path.join(step_dir, INTEGRITY_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(record, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))
  _fsync_dir(step_dir)
  return record


def verify_integrity(step_dir: str) -> tuple[Optional[bool], str]:
  """(True, '') intact; (False, reason) damaged; (None, '') no record (unsealed step)."""
  try:
    with open(os.path.join(step_dir, INTEGRITY_FILE)) as f:
      record = json.load(f)
    files = record['files']
  except FileNotFoundError:
    return None, ''
  except (OSError, ValueError, KeyError, TypeError) as e:
    return False, f'its integrity record {INTEGRITY_FILE} is unreadable: {type(e).__name__}'
  buffer = bytearray(1 << 24)
  for rel, (size, _) in sorted(files.items()):
    path = os.path.join(step_dir, rel)
    try:
      actual = os.path.getsize(path)
    except OSError:
      return False, f'{rel} is missing'
    if actual != size:
      return False, f'{rel} is {actual} bytes, {size} when saved'
  for rel, (_, crc) in sorted(files.items()):
    try:
      actual_crc, _ = _crc_and_size(os.path.join(step_dir, rel), buffer, sync=False)
    except OSError as e:
      return False, f'{rel} cannot be read: {os.strerror(e.errno or 0).lower()}'
    if actual_crc != crc:
      return False, f'{rel} does not match its CRC-32 recorded when saved'
  return True, ''
