"""Training system: fp16 loss scaling, devices, hosts, resume after SIGKILL, eval, bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.training import dynamic_scale as dynamic_scale_lib

from conftest import ROOT, tiny_config
from dca_jax.models import build_model
from dca_jax import checkpoint as ckpt_lib
from dca_jax import config_lib, distributed, optim, train

WORKER = os.path.join(ROOT, 'tests', 'train_worker.py')


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)
  return env


def _worker(tmp_path, name, overrides, **flags):
  out = tmp_path / name / 'params.npz'
  out.parent.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, WORKER, str(out), json.dumps(overrides)]
  for k, v in flags.items():
    cmd += [f'--{k}', str(v)]
  return cmd, out


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _assert_same_params(a, b, atol=1e-6):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-5, err_msg=k)


# --- fp16 dynamic loss scaling -------------------------------------------------------------------
def test_fp16_overflow_keeps_state_lowers_scale_and_counts():
  config = tiny_config(precision='fp16', gradient_accumulation_steps=2)
  model = build_model(config, dtype=jnp.float16)
  tx = optim.make_optimizer(config, steps_per_epoch=8)
  state, _ = train.create_train_state(config, model, tx, distributed.make_mesh(),
                                      precision='fp16', rng=jax.random.key(0))
  # -O0: the tiny fp16 step (emulated on CPU) compiles several times faster; numerics unchanged
  step = jax.jit(train.make_train_step(model, tx, config, dtype=jnp.float16, rng=jax.random.key(1)),
                 compiler_options={'xla_backend_optimization_level': 0})
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
           'label': rng.integers(0, 4, 4).astype(np.int32)}
  # A scale this large makes the fp16 backward pass overflow.
  huge = state.replace(loss_scale=dynamic_scale_lib.DynamicScale(scale=jnp.asarray(6e4 ** 3)))
  before = jax.device_get(huge)
  after, metrics = step(huge, batch)
  after = jax.device_get(after)
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert float(after.loss_scale.scale) == pytest.approx(0.5 * 6e4 ** 3)
  assert int(after.skipped) == 1 and int(metrics['skipped_steps']) == 1
  # With a sane scale the same batch is finite and does update (accumulation: after 2 steps).
  sane = after.replace(loss_scale=dynamic_scale_lib.DynamicScale(scale=jnp.asarray(2.0 ** 10)))
  s1, _ = step(jax.device_put(sane), batch)
  s2, m2 = step(s1, batch)
  assert int(m2['skipped_steps']) == 1
  moved = [float(jnp.abs(a - b).max()) for a, b in
           zip(jax.tree.leaves(after.params), jax.tree.leaves(jax.device_get(s2.params)))]
  assert max(moved) > 0


# --- devices and hosts -----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  """3 steps on 1 device: the reference both 8-device runs are compared with."""
  overrides = dict(batch_size=8, num_pwca_layers=2, stochastic_depth_prob=0.1,
                   pwca_partners='global')
  cmd, out = _worker(tmp_path_factory.mktemp('one'), 'd1', overrides, devices=1, steps=3)
  r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return overrides, _load(out)


@pytest.mark.xdist_group('one_device_run')  # both share the module fixture's run
@pytest.mark.parametrize('fsdp', [False, True])
def test_eight_devices_match_one_device(tmp_path, fsdp, one_device_run):
  # the same pairing on 8 devices as on 1: partners drawn over the global batch
  overrides, one = one_device_run
  cmd, out = _worker(tmp_path, 'd8', dict(overrides, fsdp=fsdp), devices=8, steps=3)
  r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  # fsdp: the kernels really are split over the 8 devices (else everything is replicated)
  assert (report['sharded_param_leaves'] > 5) if fsdp else report['sharded_param_leaves'] == 0
  if not fsdp:  # replicated params: the only all-gather is of the partners' keys/values
    assert report['all_gathers'] > 0, report
  eight = _load(out)
  # Adam moves each weight by ~lr per step whatever the gradient's size, so float-rounding
  # differences of the 8-way reduction in near-zero gradients can reach a fraction of lr in a
  # few weights; a wrong sharding (other partners, a missing all-reduce) moves all of them by ~lr.
  lr = config_lib.scaled_learning_rate(tiny_config(**overrides))
  keys = [k for k in one if not k.startswith('init:')]
  diffs = np.concatenate([np.abs(one[k] - eight[k]).ravel() for k in keys])
  moved = np.concatenate([np.abs(one[k] - one['init:' + k]).ravel() for k in keys])
  assert np.median(moved) > 0.5 * lr          # the steps really updated the weights
  assert diffs.max() < 0.1 * lr and np.mean(diffs) < 1e-3 * lr


_COLLECTIVES = r"""
import json, os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], 'tests')]
import jax
from conftest import tiny_config
from dca_jax import distributed, train
trainer = train.Trainer(tiny_config(batch_size=16, pwca_partners='per_device'), sys.argv[2])
batch = distributed.global_batch(next(trainer.input.train_iter()), trainer.batch_sharding)
hlo = trainer.train_step.lower(trainer.state, batch).compile().as_text()
trainer.checkpointer.close()
print(json.dumps({op: hlo.count(op + '(') for op in ('all-gather', 'all-reduce')}))
"""


def test_per_device_pwca_partners_gather_no_activations_across_devices(tmp_path):
  """8 simulated devices, 2 images each: with partners drawn within each device's share the
  compiled train step has no all-gather, only the gradients' all-reduce (drawn over the global
  batch, they are all-gathered: test_eight_devices_match_one_device[False] checks that)."""
  r = subprocess.run([sys.executable, '-c', _COLLECTIVES, ROOT, str(tmp_path / 'w')], env=_env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  counts = json.loads(r.stdout.strip().splitlines()[-1])
  assert counts['all-gather'] == 0, counts
  assert counts['all-reduce'] > 0, counts  # the data-parallel gradient sum


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_train_identically(tmp_path):
  port = _free_port()
  procs, outs = [], []
  for pid in range(2):
    cmd, out = _worker(tmp_path, f'p{pid}', dict(batch_size=4), steps=3,
                       coordinator=f'localhost:{port}', num_processes=2, process_id=pid)
    procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
    outs.append(out)
  results = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    results.append(json.loads(stdout.strip().splitlines()[-1]))
  assert [r['processes'] for r in results] == [2, 2]
  a, b = _load(outs[0]), _load(outs[1])
  _assert_same_params(a, b, atol=0)
  # the params really moved (not two idle processes agreeing on the init)
  assert max(np.abs(a[k] - a['init:' + k]).max() for k in a if not k.startswith('init:')) > 1e-4


# --- main.py end to end: resume after SIGKILL, eval from the restored checkpoint ------------------
def _main(workdir, *extra, mode='train'):
  return [sys.executable, os.path.join(ROOT, 'main.py'), '--config', os.path.join(ROOT, 'tests',
          'tiny_config.py'), '--workdir', str(workdir), '--mode', mode, *extra]


def _final_params(workdir):
  step = max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  ck = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  import orbax.checkpoint as ocp
  restored = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ck.close()
  from flax import traverse_util
  return step, {k: np.asarray(v) for k, v in
                traverse_util.flatten_dict(restored['state']['params'], sep='/').items()}


def test_sigkill_then_resume_equals_uninterrupted_run_and_eval_reproduces(tmp_path):
  args = ['--config.max_steps=12', '--config.save_every_steps=4', '--config.num_epochs=2',
          '--config.stochastic_depth_prob=0.1']
  whole, killed = tmp_path / 'whole', tmp_path / 'killed'
  ref = subprocess.Popen(_main(whole, *args), env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  victim = subprocess.Popen(_main(killed, *args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  ckdir = killed / 'checkpoints'
  deadline = time.time() + 240
  while not (ckdir / '4').is_dir() and time.time() < deadline and victim.poll() is None:
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  steps_at_kill = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
  assert steps_at_kill and max(steps_at_kill) < 12, steps_at_kill  # really interrupted
  resumed = subprocess.run(_main(killed, *args), env=_env(), capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from' in resumed.stdout
  out, _ = ref.communicate(timeout=300)
  assert ref.returncode == 0, out[-3000:]
  step_a, a = _final_params(whole)
  step_b, b = _final_params(killed)
  assert step_a == step_b == 12
  _assert_same_params(a, b, atol=1e-6)

  # eval restores the checkpoint and reproduces the accuracy measured at the end of training
  ev = subprocess.run(_main(whole, mode='eval'), env=_env(), capture_output=True, text=True,
                      timeout=300)
  assert ev.returncode == 0, ev.stderr[-3000:]
  result = json.load(open(whole / 'eval.json'))
  last = [json.loads(l) for l in open(whole / 'metrics.jsonl') if '"eval/accuracy"' in l][-1]
  assert result['num_images'] == 20 == last['eval/num_images']
  assert result['accuracy'] == pytest.approx(last['eval/accuracy'])
  assert result['accuracy_glca'] == pytest.approx(last['eval/accuracy_glca'])
  assert result['step'] == 12


# --- bad input: one clear line, nothing damaged ------------------------------------------------------
def _run_main(workdir, *extra, mode='train'):
  return subprocess.run(_main(workdir, *extra, mode=mode), env=_env(), capture_output=True,
                        text=True, timeout=300)


def test_unknown_config_key_is_one_clear_error(tmp_path):
  r = _run_main(tmp_path, '--config.batchsize=8')
  assert r.returncode != 0
  assert 'batchsize' in r.stderr
  assert 'Traceback' not in r.stderr


def test_eval_of_empty_workdir_is_one_clear_error(tmp_path):
  r = _run_main(tmp_path / 'nothing', mode='eval')
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith('error: no checkpoint in')


def test_checkpoint_of_another_model_is_refused_and_left_intact(tmp_path):
  config = tiny_config(max_steps=2, save_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  snapshot = {p: os.path.getsize(os.path.join(d, p)) for d, _, files in os.walk(tmp_path)
              for p in files}
  for other in (dict(num_classes=5), dict(backbone_overrides=dict(width=64, depth=2, num_heads=2,
                                                                  mlp_dim=64, patch_size=8))):
    with pytest.raises(ckpt_lib.CheckpointError, match='another model'):
      train.train_and_evaluate(tiny_config(max_steps=4, **other), str(tmp_path))
  after = {p: os.path.getsize(os.path.join(d, p)) for d, _, files in os.walk(tmp_path) for p in files}
  assert {k: v for k, v in after.items() if 'metrics' not in k} == \
         {k: v for k, v in snapshot.items() if 'metrics' not in k}


def test_resume_says_the_pretrained_weights_are_not_loaded(tmp_path, capsys):
  train.train_and_evaluate(tiny_config(max_steps=2, save_every_steps=2), str(tmp_path))
  capsys.readouterr()
  missing = str(tmp_path / 'not_even_there.npz')  # never opened: the checkpoint wins
  train.train_and_evaluate(tiny_config(max_steps=3, pretrained_model=missing), str(tmp_path))
  out = capsys.readouterr().out
  assert f'pretrained_model {missing} is not loaded' in out and 'Resumed from' in out


def test_batch_not_divisible_by_devices_and_missing_dataset(tmp_path):
  cmd, _ = _worker(tmp_path, 'bad', dict(batch_size=6), devices=4)
  r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and 'batch_size=6 is not divisible by the 4 devices' in r.stderr
  from dca_jax import data
  with pytest.raises(data.DataError, match='does-not-exist'):
    train.Trainer(tiny_config(dataset='cub', data_source='folder', num_classes=200,
                              data_dir=str(tmp_path / 'does-not-exist')), str(tmp_path / 'w'))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  p = subprocess.Popen(_main(tmp_path, '--config.max_steps=400', '--config.num_epochs=50',
                             '--config.save_every_steps=3'),
                       env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  ckdir = tmp_path / 'checkpoints'
  deadline = time.time() + 240
  while not (ckdir / '3').is_dir() and time.time() < deadline and p.poll() is None:
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out[-3000:]
  assert 'SIGTERM: saved step' in out
  saved = int(out.split('SIGTERM: saved step ')[1].split(',')[0])
  assert 3 <= saved < 400 and (ckdir / str(saved)).is_dir()


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  accuracies = [None, 0.9, None, 0.6, 0.2, None, 0.5]  # None: a save between evaluations
  for step, acc in enumerate(accuracies, start=1):
    ck.save(step, {'x': jnp.full((2,), float(step))}, {'m': 1}, score=acc)
  ck.close()
  ro = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  assert ro.best_step() == 2 and ro.latest_step() == 7
  assert ro.all_steps() == [2, 6, 7]  # the best, and the latest 2
  with pytest.raises(ckpt_lib.CheckpointError, match='read-only'):
    ro.save(8, {'x': jnp.zeros(2)}, {'m': 1})
  ro.close()


def test_sigterm_on_one_host_stops_every_host_after_one_save(tmp_path):
  """The save is collective: a SIGTERM that reaches only host 1 must stop host 0 too."""
  port = _free_port()
  procs = [subprocess.Popen(_main(tmp_path, '--config.max_steps=400', '--config.num_epochs=50',
                                  '--config.save_every_steps=3',
                                  f'--coordinator_address=localhost:{port}', '--num_processes=2',
                                  f'--process_id={pid}'),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in range(2)]
  ckdir = tmp_path / 'checkpoints'
  deadline = time.time() + 240
  while not (ckdir / '3').is_dir() and time.time() < deadline and procs[1].poll() is None:
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=180)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  assert 'SIGTERM: saved step' in outs[0]  # printed by the chief, which got no signal itself
  saved = int(outs[0].split('SIGTERM: saved step ')[1].split(',')[0])
  assert 3 <= saved < 400 and (ckdir / str(saved)).is_dir()
