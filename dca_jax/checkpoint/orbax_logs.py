"""Orbax's background-save failures, captured for the one-line error instead of logged twice.

A failed async save (a full disk) reaches `Checkpointer` as an exception, which becomes one
line; Orbax also logs it with its traceback, asyncio reports the sibling writes' errors, and
TensorStore's late callbacks raise on closed event loops. The filters installed here drop those
records (keeping their exception in `CAPTURED` for the line) and nothing else.
"""

from __future__ import annotations

import errno
import logging as pylogging
import os
import sys

from absl import logging

CAPTURED: list[BaseException] = []
_ORBAX_FAILURE_LOGS = ('Failed to run', 'Save Finalize thread', 'Checkpointer failed',
                       'one or more items may not be finalized')


class _OrbaxSaveFailureFilter(pylogging.Filter):
  """Orbax logs a failed async save with its traceback (and again while re-raising it); the
  exception reaches `Checkpointer`, which turns it into one line, so the records are dropped
  here and their exception kept for that line."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if not record.pathname or 'orbax' not in record.pathname:
      return True
    with_exception = bool(record.exc_info and record.exc_info[1] is not None)
    if (any(m in str(record.msg) for m in _ORBAX_FAILURE_LOGS)
        or (with_exception and record.levelno >= pylogging.ERROR)):
      if with_exception:  # e.g. a writer thread's 'raised an exception' (full disk)
        CAPTURED.append(record.exc_info[1])
      return False
    return True


class _OrphanedFutureFilter(pylogging.Filter):
  """asyncio's 'exception was never retrieved' for the sibling writes of a failed Orbax save
  (each shard's write fails alike on a full disk): the first one makes the line."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is None or 'never retrieved' not in str(record.msg):
      return True
    tb, frames = error.__traceback__, []
    while tb is not None:
      frames.append(tb.tb_frame.f_code.co_filename)
      tb = tb.tb_next
    # A write error set on the future from TensorStore's thread may carry no traceback: then
    # the path it names (Orbax's temporary step folder) says whose it is.
    if any('orbax' in f for f in frames) or '.orbax-checkpoint-tmp' in str(error):
      CAPTURED.append(error)
      return False
    return True


_FILTER = _OrbaxSaveFailureFilter()
if _FILTER not in logging.get_absl_logger().filters:
  logging.get_absl_logger().addFilter(_FILTER)
pylogging.getLogger('asyncio').addFilter(_OrphanedFutureFilter())


def _is_closed_loop_callback(error) -> bool:
  """RuntimeError('Event loop is closed') raised in asyncio's call_soon_threadsafe."""
  if not (isinstance(error, RuntimeError) and 'Event loop is closed' in str(error)):
    return False
  tb, names = error.__traceback__, []
  while tb is not None:
    names.append(tb.tb_frame.f_code.co_name)
    tb = tb.tb_next
  return 'call_soon_threadsafe' in names


def _quiet_closed_loop_callbacks() -> None:
  """When an async save fails (a full disk), TensorStore's write callbacks for the other shards
  still arrive, on event loops Orbax has closed meanwhile; each raises 'Event loop is closed'
  in call_soon_threadsafe and Python prints it with its traceback (through sys.excepthook from
  TensorStore's threads). Those, and only those, are dropped: the failure has its own line."""
  if getattr(sys.excepthook, '_dca_jax', False):
    return
  previous_excepthook, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(kind, value, tb):
    if not _is_closed_loop_callback(value):
      previous_excepthook(kind, value, tb)

  def unraisablehook(unraisable):
    if not _is_closed_loop_callback(unraisable.exc_value):
      previous_unraisable(unraisable)

  excepthook._dca_jax = unraisablehook._dca_jax = True  # pylint: disable=protected-access
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


_quiet_closed_loop_callbacks()


def io_reason(error: BaseException) -> str:
  """'no space left on device' / the OS error / the exception's first line."""
  seen, todo = set(), [error]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return os.strerror(e.errno).lower() if e.errno == errno.ENOSPC else (
          f'{os.strerror(e.errno).lower()} ({e.filename or ""})'.replace(' ()', ''))
    text = str(e).lower()
    if ('no space left' in text or 'enospc' in text
        or ('resource_exhausted' in text and 'space' in text)):
      return 'no space left on device'
    if 'quota' in text:
      return 'disk quota exceeded'
    todo += [e.__cause__, e.__context__, *getattr(e, 'exceptions', ())]
  first = (str(error).strip().splitlines() or [''])[0][:200]
  return f'{type(error).__name__}: {first}'




class DropMessage(pylogging.Filter):
  """Drops log records whose message contains `text` (a known, harmless Orbax line)."""

  def __init__(self, text: str):
    super().__init__()
    self.text = text

  def filter(self, record: pylogging.LogRecord) -> bool:
    return self.text not in str(record.msg)
