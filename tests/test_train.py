"""Training system: fp16 loss scaling, the BN necks, the loss through the step, devices, hosts,
resume after SIGKILL (mid-accumulation), fp16 resume, eval against its own top-1, bad input."""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
  assert_leaves_equal,
  count_build,
  assert_same_params,
  main_cmd,
  run_main,
  subprocess_env,
  tiny_config,
  tiny_reid_config,
  train_worker_cmd,
)
from flax.training import dynamic_scale as dynamic_scale_lib

from dca_jax import checkpoint, config_lib, distributed, optim, train, train_step
from dca_jax import checkpoint as ckpt_lib
from dca_jax.models import build_model

# --- fp16 dynamic loss scaling, the BN necks, accumulation ----------------------------------------


# --- devices and hosts ---------------------------------------------------------------------------


# --- main.py end to end: resume after SIGKILL, eval from the restored checkpoint ------------------
def _final_state(workdir):
  """(step, {path: array}) of the newest checkpoint's whole train state: params, optimizer
  (MultiSteps' accumulated gradient and counters included), step, skip count."""
  step = max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  ck = ckpt_lib.Checkpointer(str(workdir), read_only=True)
  import orbax.checkpoint as ocp
  restored = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ck.close()
  return step, {jax.tree_util.keystr(path, simple=True, separator='/'): np.asarray(v)
                for path, v in jax.tree_util.tree_leaves_with_path(restored['state'])}


# 12 micro-steps, 4 per update, saves every 3: every save the kill can land after (3, 6, 9) is
# in the middle of an accumulation, so the resume must restore the accumulated gradient.
_RESUME_ARGS = dict(max_steps=12, save_every_steps=3, num_epochs=2, stochastic_depth_prob=0.1,
                    gradient_accumulation_steps=4)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run_and_eval_reproduces(tmp_path):
  args = [f'--config.{k}={v}' for k, v in _RESUME_ARGS.items()]
  whole, killed = tmp_path / 'whole', tmp_path / 'killed'
  ref = subprocess.Popen(main_cmd(whole, *args), env=subprocess_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  victim = subprocess.Popen(main_cmd(killed, *args), env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  ckdir = killed / 'checkpoints'
  deadline = time.time() + 240
  while not (ckdir / '3').is_dir() and time.time() < deadline and victim.poll() is None:
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  steps_at_kill = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
  assert steps_at_kill and max(steps_at_kill) < 12, steps_at_kill  # really interrupted
  resumed = subprocess.run(main_cmd(killed, *args), env=subprocess_env(), capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from' in resumed.stdout
  out, _ = ref.communicate(timeout=300)
  assert ref.returncode == 0, out[-3000:]
  step_a, a = _final_state(whole)
  step_b, b = _final_state(killed)
  assert step_a == step_b == 12 and int(a['opt_state/gradient_step']) == 3
  assert_same_params(a, b, atol=1e-6)

  # eval restores the checkpoint and reproduces the accuracy measured at the end of training
  # (in this process: the eval mode's function, as main.py calls it)
  from dca_jax import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.run_eval(tiny_config(**_RESUME_ARGS), str(whole), 'latest')
  result = json.load(open(whole / 'eval.json'))
  last = [json.loads(line) for line in open(whole / 'metrics.jsonl')
          if '"eval/accuracy"' in line][-1]
  assert result['num_images'] == 20 == last['eval/num_images']
  assert result['accuracy'] == pytest.approx(last['eval/accuracy'])
  assert result['accuracy_glca'] == pytest.approx(last['eval/accuracy_glca'])
  assert result['step'] == 12


def test_fp16_resume_restores_the_loss_scale_accumulation_and_skip_count(tmp_path):
  """An fp16 train state in the middle of an accumulation, with a loss scale, finite-step count
  and skip count of its own, saved and restored as a resume does (Trainer.restore's calls):
  every leaf comes back (a resume that re-created the loss scale would restart at 2^15, 0)."""
  config = tiny_config(precision='fp16', gradient_accumulation_steps=4)
  model = build_model(config, dtype=jnp.float16)
  tx = optim.make_optimizer(config, steps_per_epoch=8)
  state, shardings = train_step.create_train_state(config, model, tx, distributed.make_mesh(),
                                              precision='fp16', rng=jax.random.key(0))
  opt = state.opt_state
  state = state.replace(
      step=jnp.asarray(7, jnp.int32), skipped=jnp.asarray(2, jnp.int32),
      loss_scale=dynamic_scale_lib.DynamicScale(scale=jnp.asarray(2.0 ** 9),
                                                fin_steps=jnp.asarray(5, jnp.int32)),
      opt_state=opt._replace(mini_step=jnp.asarray(3, jnp.int32),
                             gradient_step=jnp.asarray(1, jnp.int32),
                             acc_grads=jax.tree.map(lambda g: g + 0.25, opt.acc_grads)))
  meta = ckpt_lib.model_meta(config, loss_scale=True)
  saver = ckpt_lib.Checkpointer(str(tmp_path))
  saver.save(7, state, meta, force=True)
  saver.close()
  reader = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  try:
    assert reader.newest_intact_step() == 7
    restored = jax.device_get(reader.restore(7, ckpt_lib.abstract_like(state, shardings), meta))
  finally:
    reader.close()
  assert float(restored.loss_scale.scale) == 2.0 ** 9 and int(restored.loss_scale.fin_steps) == 5
  assert_leaves_equal(jax.device_get(state), restored)


# --- bad input: one clear line, nothing damaged --------------------------------------------------
def test_unknown_config_key_is_one_clear_error(tmp_path):
  r = run_main(tmp_path, '--config.batchsize=8')
  assert r.returncode != 0
  assert 'batchsize' in r.stderr
  assert 'Traceback' not in r.stderr


def test_eval_of_empty_workdir_is_one_clear_error(tmp_path):
  r = run_main(tmp_path / 'nothing', mode='eval')
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1].startswith('error: no checkpoint in')


@pytest.fixture(scope='module')
def two_step_run(tmp_path_factory):
  """A finished 2-step run; each test resumes a copy of it."""
  count_build('test_train.two_step_run')
  workdir = tmp_path_factory.mktemp('two_steps') / 'run'
  train.train_and_evaluate(tiny_config(max_steps=2, save_every_steps=2), str(workdir))
  return workdir


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused_and_left_intact(tmp_path, two_step_run):
  tmp_path = tmp_path / 'run'
  shutil.copytree(two_step_run, tmp_path)
  snapshot = {p: os.path.getsize(os.path.join(d, p)) for d, _, files in os.walk(tmp_path)
              for p in files}
  for other in (dict(num_classes=5), dict(backbone_overrides=dict(width=64, depth=2, num_heads=2,
                                                                  mlp_dim=64, patch_size=8))):
    with pytest.raises(ckpt_lib.CheckpointError, match='another model'):
      train.train_and_evaluate(tiny_config(max_steps=4, **other), str(tmp_path))
  after = {p: os.path.getsize(os.path.join(d, p)) for d, _, files in os.walk(tmp_path)
           for p in files}
  assert {k: v for k, v in after.items() if 'metrics' not in k} == \
         {k: v for k, v in snapshot.items() if 'metrics' not in k}


@pytest.mark.slow
def test_resume_says_the_pretrained_weights_are_not_loaded(tmp_path, capsys, two_step_run):
  tmp_path = tmp_path / 'run'
  shutil.copytree(two_step_run, tmp_path)
  capsys.readouterr()
  missing = str(tmp_path / 'not_even_there.npz')  # never opened: the checkpoint wins
  train.train_and_evaluate(tiny_config(max_steps=3, pretrained_model=missing), str(tmp_path))
  out = capsys.readouterr().out
  assert f'pretrained_model {missing} is not loaded' in out and 'Resumed from' in out


def test_batch_not_divisible_by_devices_and_missing_dataset(tmp_path):
  cmd, _ = train_worker_cmd(tmp_path, 'bad', dict(batch_size=6), devices=4)
  r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and 'batch_size=6 is not divisible by the 4 devices' in r.stderr
  from dca_jax import data
  with pytest.raises(data.DataError, match='does-not-exist'):
    train.Trainer(tiny_config(dataset='cub', data_source='folder', num_classes=200,
                              data_dir=str(tmp_path / 'does-not-exist')), str(tmp_path / 'w'))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  p = subprocess.Popen(main_cmd(tmp_path, '--config.max_steps=400', '--config.num_epochs=50',
                             '--config.save_every_steps=3'),
                       env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


# --- a run as pretrained weights: fine-tune from your own pretraining (docs/REID.md) -----------
def _fresh_params(config):
  model = build_model(config, dtype=jnp.float32)
  shape = (1, *config_lib.input_hw(config), 3)
  return jax.device_get(model.init(jax.random.key(1), jnp.zeros(shape), train=False)['params'])


@pytest.mark.slow
def test_a_run_is_pretrained_weights_for_another_task(tmp_path, two_step_run, caplog):
  """An FGVC run (32 x 32 px, 4 classes) loads into a Re-ID model (32 x 16 px, 6 identities):
  backbone and GLCA block from the run's newest checkpoint, positions resized 4x4 -> 4x2, the
  task heads left as initialised; what a run is not gives one line."""
  from dca_jax import hub, weights  # pylint: disable=g-import-not-at-top
  _, saved = _final_state(two_step_run)
  config = tiny_reid_config(pretrained_model=str(two_step_run))
  fresh = _fresh_params(config)
  loaded = train_step.load_pretrained_params(config, fresh)
  flat = lambda tree: {jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(v)
                       for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  loaded, fresh = flat(loaded), flat(fresh)
  backbone = [k for k in loaded if k.split('/')[0] in ('embed', 'norm', 'glca_block')
              or k.startswith('block_')]
  assert len(backbone) > 20 and any(k.startswith('glca_block/') for k in backbone)
  for name in backbone:
    if name == 'embed/pos_embed':
      continue
    np.testing.assert_array_equal(loaded[name], saved['params/' + name], err_msg=name)
  # GLCA came from the run, not from its own last SA block (glca_init_from_sa is on)
  assert not np.array_equal(loaded['glca_block/attn/qkv/kernel'],
                            saved['params/block_1/attn/qkv/kernel'])
  old, new = saved['params/embed/pos_embed'], loaded['embed/pos_embed']
  assert old.shape == (1, 17, 32) and new.shape == (1, 9, 32)
  np.testing.assert_array_equal(new[:, 0], old[:, 0])             # the CLS slot is kept
  np.testing.assert_allclose(new[:, 1:], weights.resize_posemb(old, (4, 2))[:, 1:], atol=0)
  heads = [k for k in loaded if k not in backbone and k != 'embed/pos_embed']
  assert heads and all(np.array_equal(loaded[k], fresh[k]) for k in heads)  # not loaded
  assert 'dca_jax run' in hub.banner_line(str(two_step_run),
                                          train_step.load_pretrained(config, fresh)[1])
  # a step folder works the same; a damaged or foreign directory is one line
  step_dir = max((d for d in (two_step_run / 'checkpoints').iterdir() if d.name.isdigit()),
                 key=lambda d: int(d.name))
  assert set(checkpoint.read_run(step_dir)) == set(checkpoint.read_run(two_step_run))
  with pytest.raises(weights.WeightLoadError, match='not a dca_jax run'):
    weights.read_checkpoint(tmp_path)
  broken = tmp_path / 'broken'
  shutil.copytree(two_step_run, broken)
  target = next(p for p in (broken / 'checkpoints' / step_dir.name / 'state').rglob('*')
                if p.is_file() and p.stat().st_size > 1000)
  target.write_bytes(b'\0' * target.stat().st_size)
  with pytest.raises(weights.WeightLoadError) as error:
    weights.read_checkpoint(broken / 'checkpoints' / step_dir.name)
  assert 'damaged' in str(error.value) and '\n' not in str(error.value)
