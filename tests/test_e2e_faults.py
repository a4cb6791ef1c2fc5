"""Faults a long run meets, done for real: kill -9 (during a save, between commit and seal, mid
training), truncated checkpoint files, two trainings in one workdir, a full disk (a real tmpfs),
a diverging loss. After each, one clear line, nothing written before the fault lost, and the
resumed run's final params equal the uninterrupted run's bit for bit.

One uninterrupted reference run (in-process) is shared by every case.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, count_build, subprocess_env, tiny_config

from dca_jax import checkpoint as ckpt_lib
from dca_jax import evaluate, train
from dca_jax import lock as lock_lib
from dca_jax.checkpoint import orbax_logs

pytestmark = pytest.mark.slow  # kill -9, full disk, damaged files: real faults, real processes
STEPS = dict(max_steps=12, save_every_steps=4, keep_checkpoints=3, num_epochs=2)
ARGS = [f'--config.{k}={v}' for k, v in STEPS.items()]
WORKER = os.path.join(ROOT, 'tests', 'fault_worker.py')
NOISE = ('oneDNN custom operations', 'absl::InitializeLog')


def _main_args(workdir, *extra):
  return ['--config', os.path.join(ROOT, 'tests', 'tiny_config.py'), '--workdir', str(workdir),
          *ARGS, *extra]


def _params(workdir, step):
  import orbax.checkpoint as ocp
  from flax import traverse_util
  ck = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  try:
    restored = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    ck.close()
  return {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(restored['state']['params'], sep='/').items()}


def _assert_bitwise_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run: checkpoints 4, 8, 12 (all sealed) and their params."""
  count_build('test_e2e_faults.reference')
  workdir = tmp_path_factory.mktemp('reference')
  train.train_and_evaluate(tiny_config(**STEPS), str(workdir))
  assert _steps(workdir) == [4, 8, 12]
  return workdir, {s: _params(workdir, s) for s in (4, 8, 12)}


def _copy(reference_dir, dest, keep=(4, 8, 12)):
  shutil.copytree(reference_dir, dest)
  for s in {4, 8, 12} - set(keep):
    shutil.rmtree(os.path.join(dest, 'checkpoints', str(s)))
  return dest


def _truncate_arrays(step_dir):
  files = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd', '*'))
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


# --- kill -9 -----------------------------------------------------------------------------------
def test_kill9_during_save_and_before_seal_then_resume_is_exact(reference, tmp_path, capsys):
  ref_dir, ref = reference
  w = tmp_path / 'w'
  # 1. killed while Orbax finishes step 4 (every file written, not yet renamed into place)
  r = subprocess.run([sys.executable, WORKER, 'before_commit', '4', *_main_args(w)], env=subprocess_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
  assert _steps(w) == [] and glob.glob(str(w / 'checkpoints' / '4.*tmp*'))  # only the partial one
  # 2. restarts from scratch (the partial step is not a step); killed right after step 8 is
  #    committed, before it is sealed: 8 has no integrity record yet
  r = subprocess.run([sys.executable, WORKER, 'before_seal', '8', *_main_args(w)], env=subprocess_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
  assert 'was stale; taken over' in r.stdout  # the lock the first kill left behind
  assert _steps(w) == [4, 8] and not glob.glob(str(w / 'checkpoints' / '*tmp*'))
  assert ckpt_lib.verify_integrity(str(w / 'checkpoints' / '4'))[0] is True
  assert ckpt_lib.verify_integrity(str(w / 'checkpoints' / '8'))[0] is None
  # 3. resumes from the unsealed step 8 (reading it whole, then sealing it) and finishes
  capsys.readouterr()
  train.train_and_evaluate(tiny_config(**STEPS), str(w))
  out = capsys.readouterr().out
  assert f'Resumed from {w}/checkpoints/8' in out and 'stale; taken over' in out
  for s in (4, 8, 12):  # nothing written before a fault is lost; the end is the reference's
    _assert_bitwise_equal(_params(w, s), ref[s])
  assert all(ckpt_lib.verify_integrity(str(w / 'checkpoints' / str(s)))[0] for s in (4, 8, 12))


# --- damaged checkpoints -------------------------------------------------------------------------
@pytest.mark.parametrize('sealed', [True, False])
def test_damaged_latest_checkpoint_is_named_and_the_newest_intact_one_used(reference, tmp_path,
                                                                           capsys, sealed):
  ref_dir, ref = reference
  w = _copy(ref_dir, tmp_path / 'w')
  step12 = os.path.join(w, 'checkpoints', '12')
  _truncate_arrays(step12)
  if not sealed:  # killed before its record was written: found when its files are read
    os.remove(os.path.join(step12, ckpt_lib.INTEGRITY_FILE))
  capsys.readouterr()
  if sealed:  # eval --checkpoint latest: named, skipped (not moved), the newest intact one used
    result = evaluate.run_eval(tiny_config(**STEPS), str(w), 'latest')
    out = capsys.readouterr().out
    assert result['step'] == 8
    assert f'checkpoint {w}/checkpoints/12 is damaged (state/ocdbt.process_0/d/' in out
    assert 'when saved); skipped' in out and os.path.isdir(step12)
  train.train_and_evaluate(tiny_config(**STEPS), str(w))
  out = capsys.readouterr().out
  line = [l for l in out.splitlines() if 'is damaged' in l]
  assert len(line) == 1, out
  assert ('when saved' if sealed else 'unreadable: Encountered error while reading') in line[0]
  assert 'TensorStore details' not in out
  moved = glob.glob(os.path.join(w, ckpt_lib.DAMAGED_DIR, '12-*'))
  assert len(moved) == 1 and f'moved to {moved[0]}' in line[0]  # kept, out of the way
  assert f'Resumed from {w}/checkpoints/8' in out
  _assert_bitwise_equal(_params(w, 12), ref[12])


# --- divergence ----------------------------------------------------------------------------------
def test_nonfinite_loss_stops_at_the_log_naming_step_and_last_good_checkpoint(reference, tmp_path):
  ref_dir, ref = reference
  w = _copy(ref_dir, tmp_path / 'w', keep=(4,))
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(tiny_config(**dict(STEPS, learning_rate=1e25, max_grad_norm=0.0)),
                             str(w))
  message = str(e.value)
  assert 'training diverged at step' in message and 'loss=nan' in message, message
  assert f'the last good checkpoint is {w}/checkpoints/4' in message
  assert _steps(w) == [4]  # no save after the first non-finite update
  _assert_bitwise_equal(_params(w, 4), ref[4])
  assert not os.path.exists(os.path.join(w, lock_lib.LOCK_NAME))  # released


def test_nonfinite_weights_are_never_saved_between_logs(tmp_path):
  # main.py as a user runs it; logs every 100 steps: the check before each save stops it
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *_main_args(
      tmp_path, '--config.learning_rate=1e25', '--config.max_grad_norm=0',
      '--config.log_every_steps=100', '--config.save_every_steps=2')], env=subprocess_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]  # above it only the progress bar
  assert not any(n in r.stderr for n in NOISE), r.stderr[:2000]  # TensorFlow's start-up lines
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: training diverged at step 2: the weights are not finite '
                         '(before saving); stopped without saving; no checkpoint was saved '
                         'before'), last
  assert _steps(tmp_path) == []


def test_fp16_skipped_step_is_not_divergence(tmp_path):
  trainer = train.Trainer(tiny_config(precision='fp16'), str(tmp_path / 'fp16'))
  try:  # an overflowing fp16 step has a non-finite loss and unchanged (finite) weights
    trainer.check_metrics(3, {'loss': np.float32('inf'), 'grad_norm': np.float32('nan')}, 2)
  finally:
    trainer.close()
  trainer = train.Trainer(tiny_config(), str(tmp_path / 'fp32'))
  try:
    with pytest.raises(train.NonFiniteError, match=r'loss=inf.*\(finite at step 2'):
      trainer.check_metrics(3, {'loss': np.float32('inf'), 'grad_norm': np.float32(1.0)}, 2)
  finally:
    trainer.close()


# --- two writers ---------------------------------------------------------------------------------
def test_second_training_in_a_workdir_is_refused_and_a_killed_ones_lock_is_stale(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'main.py'), '--config',
       os.path.join(ROOT, 'tests', 'tiny_config.py'), '--workdir', str(tmp_path),
       '--config.max_steps=100000', '--config.num_epochs=100000', '--config.log_every_steps=1000'],
      env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    lock_file = tmp_path / lock_lib.LOCK_NAME
    deadline = time.time() + 120
    while time.time() < deadline and holder.poll() is None and not (
        lock_file.exists() and f'"pid": {holder.pid}' in lock_file.read_text()):
      time.sleep(0.05)
    assert holder.poll() is None
    with pytest.raises(lock_lib.LockError, match=f'PID {holder.pid}'):  # in this process
      train.train_and_evaluate(tiny_config(), str(tmp_path))
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *_main_args(tmp_path)],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert holder.poll() is None  # still running: the refusal was not a lucky race
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()  # one line, no traceback
    assert len(lines) == 1 and lines[0].startswith(
        f'error: another training is writing to {tmp_path} (host '), r.stderr
    assert f'PID {holder.pid}, started ' in lines[0]
    # readers (eval, visualize, predict) take no lock: they may read while a training writes
    ckpt_lib.Checkpointer(str(tmp_path), read_only=True).close()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  said = []
  lock = lock_lib.acquire(str(tmp_path), say=said.append)  # the killed holder's lock is stale
  try:
    assert len(said) == 1 and f'PID {holder.pid}' in said[0] and 'stale; taken over' in said[0]
  finally:
    lock.release()


# --- a full disk ---------------------------------------------------------------------------------
def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                     capture_output=True, text=True)
  return r.returncode == 0, r.stderr.strip()


def _disk_usage(root):
  return sum(-(-os.path.getsize(os.path.join(d, f)) // 4096) * 4096
             for d, _, files in os.walk(root) for f in files)


def test_an_orphaned_orbax_write_error_is_kept_for_the_line_even_without_a_traceback():
  """asyncio's 'Future exception was never retrieved' for a sibling shard's failed write: with
  or without a traceback (set from TensorStore's thread) it is dropped and its error kept;
  anyone else's is shown. (The full-disk run below hits this only in some schedules.)"""
  import logging as pylogging  # pylint: disable=g-import-not-at-top
  orphan = orbax_logs._OrphanedFutureFilter()  # pylint: disable=protected-access

  def record(error):
    return pylogging.LogRecord('asyncio', pylogging.ERROR, 'base_events.py', 1, 'Future '
                               'exception was never retrieved', None, (type(error), error, None))
  ours = ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file '
                    '"/w/checkpoints/12.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/": '
                    'No space left on device')
  del orbax_logs.CAPTURED[:]  # pylint: disable=protected-access
  assert orphan.filter(record(ours)) is False
  assert orbax_logs.CAPTURED == [ours]  # pylint: disable=protected-access
  assert orphan.filter(record(ValueError('a user task failed'))) is True
  del orbax_logs.CAPTURED[:]  # pylint: disable=protected-access


def test_full_disk_during_a_save_is_one_line_and_resumable(reference, tmp_path):
  ref_dir, ref = reference
  mnt = tmp_path / 'small_disk'
  # room for the run up to step 8 with its checkpoints 4 and 8, not for a third checkpoint
  budget = _disk_usage(ref_dir) - _disk_usage(ref_dir / 'checkpoints' / '12') // 2
  ok, why = _mount_tmpfs(mnt, budget)
  if not ok:
    pytest.skip(f'cannot mount a tmpfs here ({why}): run as root with CAP_SYS_ADMIN')
  try:
    w = mnt / 'w'
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *_main_args(w)],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]  # above the line only the progress bar
    assert not any(n in r.stderr for n in NOISE), r.stderr[:2000]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('error: no space left on device while saving step 12 to '
                           f'{w}/checkpoints; checkpoints 4, 8 are intact'), last
    assert _steps(w) == [4, 8] and not glob.glob(str(w / 'checkpoints' / '*tmp*'))
    for s in (4, 8):  # intact, sealed, equal to the reference's
      assert ckpt_lib.verify_integrity(str(w / 'checkpoints' / str(s)))[0] is True
      _assert_bitwise_equal(_params(w, s), ref[s])
    # space freed: the same command resumes and ends where the uninterrupted run did
    subprocess.run(['mount', '-o', 'remount,size=64m', str(mnt)], check=True)
    train.train_and_evaluate(tiny_config(**STEPS), str(w))
    _assert_bitwise_equal(_params(w, 12), ref[12])
  finally:
    subprocess.run(['umount', '-l', str(mnt)], capture_output=True)
