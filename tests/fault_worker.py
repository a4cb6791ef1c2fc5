"""main.py killed by a real SIGKILL at a chosen point of a checkpoint save (tests/test_faults.py).

  python tests/fault_worker.py POINT STEP [main.py flags...]
POINT  before_commit: Orbax has written every file of step STEP into its temporary directory
                      and is about to rename it into place;
       before_seal:   step STEP is committed (renamed) but its fsync + integrity record
                      (dca_integrity.json) is not written yet.
The process kills itself with SIGKILL there: nothing of Python's shutdown runs, as with kill -9.
"""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
point, step = sys.argv[1], sys.argv[2]
sys.argv = [os.path.join(ROOT, 'main.py')] + sys.argv[3:]

from absl import app  # noqa: E402

import main  # noqa: E402


def _kill():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


if point == 'before_commit':
  from orbax.checkpoint._src.path import atomicity  # noqa: E402
  _finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if self._final_path.name == step:  # pylint: disable=protected-access
      _kill()
    return await _finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize
elif point == 'before_seal':
  from dca_jax.checkpoint import manager  # noqa: E402  (the module that seals a committed step)
  _write = manager.write_integrity

  def write_integrity(step_dir):
    if os.path.basename(step_dir) == step:
      _kill()
    return _write(step_dir)

  manager.write_integrity = write_integrity
else:
  raise SystemExit(f'unknown point {point}')

app.run(main.main, flags_parser=main.parse_flags)
