"""Training system: fp16 loss scaling, the BN necks, the loss through the step, devices, hosts,
resume after SIGKILL (mid-accumulation), fp16 resume, eval against its own top-1, bad input."""

import json
import os
import shutil
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

from conftest import ROOT, tiny_config, tiny_reid_config
from dca_jax.data import preprocess
from dca_jax.models import build_model, dcal
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


# --- fp16 dynamic loss scaling, the BN necks, accumulation ----------------------------------------
FAST = {'compiler_options': {'xla_backend_optimization_level': 0}}  # tiny fp16 steps compile faster


def _leaves_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _scale(state, scale):
  return state.replace(loss_scale=dynamic_scale_lib.DynamicScale(scale=jnp.asarray(scale)))


def test_fp16_overflow_skip_leaves_no_trace_and_bn_necks_follow_the_micro_steps():
  """Re-ID (BN necks), fp16, 2 micro-steps per update, SGD. An overflowing step keeps params,
  optimizer (accumulation included) and neck statistics bit for bit and halves the scale. Each
  later micro-step moves the necks' running statistics by its own batch (PyTorch's BatchNorm1d
  updates at every forward, accumulation or not); the params move only at the second. Loss
  scales 2^10 and 2^4 accumulate the same gradient (it is unscaled)."""
  config = tiny_reid_config(precision='fp16', gradient_accumulation_steps=2, optimizer='sgd')
  model = build_model(config, dtype=jnp.float16)
  tx = optim.make_optimizer(config, steps_per_epoch=8)
  state, _ = train.create_train_state(config, model, tx, distributed.make_mesh(),
                                      precision='fp16', rng=jax.random.key(0))
  step = jax.jit(train.make_train_step(model, tx, config, dtype=jnp.float16,
                                       rng=jax.random.key(1)), **FAST)
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(2, dtype=np.int32), 4)  # P x K = 2 x 4
  batches = [{'image': rng.integers(0, 256, (8, 32, 16, 3), dtype=np.uint8), 'label': labels}
             for _ in range(2)]
  before = jax.device_get(state)
  # A scale this large makes the fp16 backward pass overflow.
  after, metrics = step(_scale(state, 6e4 ** 3), batches[0])
  after = jax.device_get(after)
  _leaves_equal((before.params, before.opt_state, before.batch_stats),
                (after.params, after.opt_state, after.batch_stats))
  assert float(after.loss_scale.scale) == pytest.approx(0.5 * 6e4 ** 3)
  assert int(after.skipped) == 1 and int(metrics['skipped_steps']) == 1

  # after the skip: two micro-steps from the kept state (bitwise the state before the overflow:
  # the skip can leave no trace there); the first only accumulates, the second updates
  s1, _ = step(jax.device_put(_scale(after, 2.0 ** 10)), batches[0])
  s2, m2 = step(s1, batches[1])
  s1, s2 = jax.device_get((s1, s2))
  assert int(m2['skipped_steps']) == 1
  _leaves_equal(s1.params, before.params)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s2.params),
                                                         jax.tree.leaves(before.params)))
  assert moved > 1e-4
  # the accumulated gradient is unscaled: the same micro-step under scale 2^4 accumulates it too
  other, _ = step(jax.device_put(_scale(after, 2.0 ** 4)), batches[0])
  accumulated = [np.asarray(g) for g in jax.tree.leaves(s1.opt_state.acc_grads)]
  largest = max(np.abs(g).max() for g in accumulated)
  assert largest > 1e-3
  for g, o in zip(accumulated, jax.tree.leaves(jax.device_get(other.opt_state.acc_grads))):
    np.testing.assert_allclose(o, g, rtol=1e-2, atol=1e-3 * largest)
  # the necks: running mean/var after each micro-step, from the branch features (fp16 forward
  # with the params of that micro-step) and BatchNorm1d's update rule
  normalize = lambda x: preprocess.device_normalize(x, config, jnp.float16)
  forward = jax.jit(lambda p, s, x: model.apply({'params': p, 'batch_stats': s}, normalize(x)),
                    **FAST)
  expected = jax.tree.map(np.asarray, before.batch_stats)
  for batch, got in zip(batches, (s1, s2)):
    out = forward(before.params, before.batch_stats, batch['image'])
    for head, branch in (('head', 'sa'), ('glca_head', 'glca')):
      feature = np.asarray(out[f'{branch}_feature'], np.float64)
      stats = expected[head]['bnneck']
      stats['mean'] = 0.9 * stats['mean'] + 0.1 * feature.mean(0)
      stats['var'] = 0.9 * stats['var'] + 0.1 * feature.var(0, ddof=1)
      for k in ('mean', 'var'):
        np.testing.assert_allclose(got.batch_stats[head]['bnneck'][k], stats[k], rtol=2e-3,
                                   atol=2e-3, err_msg=f'{head} {k}')


def test_loss_weighting_sum_and_label_smoothing_reach_the_train_step():
  """The step's loss is Σ_b CE_b with smoothed targets (1 - ε)·onehot + ε/C, recomputed here
  from the model's outputs for the step's own partners; the w_b get no gradient and stay."""
  config = tiny_config(loss_weighting='sum', label_smoothing=0.2)
  model = build_model(config)
  tx = optim.make_optimizer(config, steps_per_epoch=8)
  state, _ = train.create_train_state(config, model, tx, distributed.make_mesh(),
                                      precision='fp32', rng=jax.random.key(0))
  base = jax.random.key(1)
  step = jax.jit(train.make_train_step(model, tx, config, dtype=jnp.float32, rng=base), **FAST)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
           'label': np.array([0, 1, 2, 3], np.int32)}
  before = jax.device_get(state)
  new, metrics = step(state, batch)
  partner_rng, dropout_rng, selection_rng = jax.random.split(jax.random.fold_in(base, 0), 3)
  out = model.apply({'params': before.params}, preprocess.device_normalize(batch['image'], config),
                    train=True, partner=dcal.derangement(partner_rng, 4),
                    rngs={'dropout': dropout_rng, 'selection': selection_rng})
  target = 0.8 * np.eye(4)[batch['label']] + 0.2 / 4
  ce = {}
  for branch in ('sa', 'glca', 'pwca'):
    z = np.asarray(out[f'{branch}_logits'], np.float64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    ce[branch] = -(target * logp).sum(1).mean()
    assert float(metrics[f'ce_{branch}']) == pytest.approx(ce[branch], rel=1e-5)
  assert float(metrics['loss']) == pytest.approx(sum(ce.values()), rel=1e-5)
  np.testing.assert_array_equal(jax.device_get(new.params['loss_weights']),
                                before.params['loss_weights'])


# --- devices and hosts ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  """3 steps on 1 device: the reference the 8-device runs and the 2-process run are compared
  with. Its batches are put in the order 2 hosts assemble them (`--as_hosts 2`)."""
  overrides = dict(batch_size=8, num_pwca_layers=2, stochastic_depth_prob=0.1,
                   pwca_partners='global')
  cmd, out = _worker(tmp_path_factory.mktemp('one'), 'd1', overrides, devices=1, steps=3,
                     as_hosts=2)
  r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return overrides, _load(out)


@pytest.mark.xdist_group('one_device_run')  # both share the module fixture's run
@pytest.mark.parametrize('fsdp', [False, True])
def test_eight_devices_match_one_device(tmp_path, fsdp, one_device_run):
  # the same pairing on 8 devices as on 1: partners drawn over the global batch
  overrides, one = one_device_run
  cmd, out = _worker(tmp_path, 'd8', dict(overrides, fsdp=fsdp), devices=8, steps=3, as_hosts=2)
  r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  # fsdp: the kernels really are split over the 8 devices (else everything is replicated)
  assert (report['sharded_param_leaves'] > 5) if fsdp else report['sharded_param_leaves'] == 0
  if not fsdp:  # replicated params: the only all-gather is of the partners' keys/values
    assert report['all_gathers'] > 0, report
  _assert_same_training(one, _load(out), overrides)


def _assert_same_training(one, other, overrides):
  """Adam moves each weight by ~lr per step whatever the gradient's size, so float-rounding
  differences of a multi-device reduction in near-zero gradients can reach a fraction of lr in
  a few weights; a wrong sharding or other data (other partners, a missing all-reduce, another
  host's shard) moves all of them by ~lr."""
  lr = config_lib.scaled_learning_rate(tiny_config(**overrides))
  keys = [k for k in one if not k.startswith('init:')]
  diffs = np.concatenate([np.abs(one[k] - other[k]).ravel() for k in keys])
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
import numpy as np
config = tiny_config(batch_size=16, pwca_partners='per_device')
trainer = train.Trainer(config, sys.argv[2])
stream = trainer.input.train_iter()
batches = [next(stream), next(stream)]
batch = distributed.global_batch(batches[0], trainer.batch_sharding)
hlo = trainer.train_step.lower(trainer.state, batch).compile().as_text()
counts = {op: hlo.count(op + '(') for op in
          ('all-gather', 'all-to-all', 'collective-permute', 'reduce-scatter', 'all-reduce')}
# The same two steps on one device, partners drawn in the same 8 groups of 2 (num_devices=8):
# the sharded program must compute what the unsharded one does.
one = jax.devices()[0]
reference = jax.device_put(jax.device_get(trainer.state), one)
ref_step = jax.jit(train.make_train_step(trainer.model, trainer.tx, config, dtype=trainer.dtype,
                                         rng=jax.random.split(jax.random.key(config.seed))[1],
                                         num_devices=8),
                   compiler_options={'xla_backend_optimization_level': 0})  # 2 steps: compile less
state = trainer.state
for host_batch in batches:
  state, _ = trainer.train_step(state, distributed.global_batch(host_batch, trainer.batch_sharding))
  reference, _ = ref_step(reference, jax.device_put(host_batch, one))
diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                           jax.tree.leaves(jax.device_get(reference.params))))
trainer.checkpointer.close()
print(json.dumps(dict(counts, max_param_diff=diff, lr=float(trainer.schedule(0)))))
"""


def test_per_device_pwca_partners_gather_no_activations_across_devices(tmp_path):
  """8 simulated devices, 2 images each: with partners drawn within each device's share the
  compiled train step moves nothing between devices but the gradients' all-reduce (no
  all-gather, all-to-all or collective-permute; drawn over the global batch, they are
  all-gathered: test_eight_devices_match_one_device[False] checks that), and two steps give
  the params of the same two steps on one device with the same 8 partner groups."""
  r = subprocess.run([sys.executable, '-c', _COLLECTIVES, ROOT, str(tmp_path / 'w')], env=_env(),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  counts = json.loads(r.stdout.strip().splitlines()[-1])
  for op in ('all-gather', 'all-to-all', 'collective-permute', 'reduce-scatter'):
    assert counts[op] == 0, counts
  assert counts['all-reduce'] > 0, counts  # the data-parallel gradient sum
  assert counts['max_param_diff'] < 0.1 * counts['lr'], counts  # Adam: a wrong step moves ~lr


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.xdist_group('one_device_run')
def test_two_processes_on_localhost_train_as_one_process(tmp_path, one_device_run):
  """2 processes of 1 device, each feeding its own host's share, against one process fed the
  same global batches (the fixture): both hosts feeding one shard, or a shard fed twice, fails."""
  overrides, one = one_device_run
  port = _free_port()
  procs, outs = [], []
  for pid in range(2):
    cmd, out = _worker(tmp_path, f'p{pid}', overrides, steps=3,
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
  _assert_same_params(a, b, atol=0)  # replicated: the hosts hold one copy
  _assert_same_training(one, a, overrides)


# --- main.py end to end: resume after SIGKILL, eval from the restored checkpoint ------------------
def _main(workdir, *extra, mode='train'):
  return [sys.executable, os.path.join(ROOT, 'main.py'), '--config', os.path.join(ROOT, 'tests',
          'tiny_config.py'), '--workdir', str(workdir), '--mode', mode, *extra]


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


def test_sigkill_then_resume_equals_uninterrupted_run_and_eval_reproduces(tmp_path):
  args = [f'--config.{k}={v}' for k, v in _RESUME_ARGS.items()]
  whole, killed = tmp_path / 'whole', tmp_path / 'killed'
  ref = subprocess.Popen(_main(whole, *args), env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  victim = subprocess.Popen(_main(killed, *args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  ckdir = killed / 'checkpoints'
  deadline = time.time() + 240
  while not (ckdir / '3').is_dir() and time.time() < deadline and victim.poll() is None:
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
  step_a, a = _final_state(whole)
  step_b, b = _final_state(killed)
  assert step_a == step_b == 12 and int(a['opt_state/gradient_step']) == 3
  _assert_same_params(a, b, atol=1e-6)

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


def test_evaluator_accuracies_equal_a_top1_from_the_model_outputs():
  """The Evaluator against a top-1 computed here from model.apply on the raw test images (the
  synthetic set's own arrays: resize_size = input_size makes the eval crop the image itself):
  21 images in batches of 8, so the last batch carries 3 padding rows that must count nowhere;
  SA+GLCA is the argmax of the sum of the two softmaxes. Weights random and large enough that
  SA, GLCA and SA+GLCA disagree on some images (else a swapped head would go unnoticed)."""
  from dca_jax import data, evaluators  # pylint: disable=g-import-not-at-top
  from dca_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from dca_jax.evaluators import classification  # pylint: disable=g-import-not-at-top
  config = tiny_config(resize_size=32, synthetic_num_test=21, eval_batch_size=8)
  model = build_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  rng = np.random.default_rng(0)  # 9, 7 and 6 of the 21 right for SA, GLCA and SA+GLCA
  params = jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32),
                        shapes['params'])
  mesh = distributed.make_mesh()
  evaluator = classification.Evaluator(evaluators.Context(
      config, model, data.build_input(config, with_train=False), mesh,
      distributed.replicated(mesh), jnp.float32))
  result = dict(evaluator.run({'params': params}))
  generated = synthetic.generate(4, config.synthetic_num_train, 21, 32, config.synthetic_seed,
                                 config.synthetic_distractors, config.synthetic_detail_size)
  out = jax.jit(model.apply)({'params': params},
                             preprocess.normalize(generated.test_images, config))
  softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(
      z - z.max(1, keepdims=True)).sum(1, keepdims=True)
  sa, glca = (np.asarray(out[f'{b}_logits'], np.float64) for b in ('sa', 'glca'))
  predictions = {'accuracy_sa': sa.argmax(1), 'accuracy_glca': glca.argmax(1),
                 'accuracy': (softmax(sa) + softmax(glca)).argmax(1)}
  hits = {k: predicted == generated.test_labels for k, predicted in predictions.items()}
  # the three heads score differently, so a swapped or missing head changes a figure
  assert len({h.sum() for h in hits.values()}) == 3, hits
  assert result['num_images'] == 21
  for key, hit in hits.items():
    assert result[key] == pytest.approx(hit.mean()), key


def test_fp16_resume_restores_the_loss_scale_accumulation_and_skip_count(tmp_path):
  """An fp16 train state in the middle of an accumulation, with a loss scale, finite-step count
  and skip count of its own, saved and restored as a resume does (Trainer.restore's calls):
  every leaf comes back (a resume that re-created the loss scale would restart at 2^15, 0)."""
  config = tiny_config(precision='fp16', gradient_accumulation_steps=4)
  model = build_model(config, dtype=jnp.float16)
  tx = optim.make_optimizer(config, steps_per_epoch=8)
  state, shardings = train.create_train_state(config, model, tx, distributed.make_mesh(),
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
  _leaves_equal(jax.device_get(state), restored)


# --- bad input: one clear line, nothing damaged --------------------------------------------------
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


@pytest.fixture(scope='module')
def two_step_run(tmp_path_factory):
  """A finished 2-step run; each test resumes a copy of it."""
  workdir = tmp_path_factory.mktemp('two_steps') / 'run'
  train.train_and_evaluate(tiny_config(max_steps=2, save_every_steps=2), str(workdir))
  return workdir


@pytest.mark.xdist_group('two_step_run')
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


@pytest.mark.xdist_group('two_step_run')
def test_resume_says_the_pretrained_weights_are_not_loaded(tmp_path, capsys, two_step_run):
  tmp_path = tmp_path / 'run'
  shutil.copytree(two_step_run, tmp_path)
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


# --- a run as pretrained weights: fine-tune from your own pretraining (docs/REID.md) -----------
def _fresh_params(config):
  model = build_model(config, dtype=jnp.float32)
  shape = (1, *config_lib.input_hw(config), 3)
  return jax.device_get(model.init(jax.random.key(1), jnp.zeros(shape), train=False)['params'])


@pytest.mark.xdist_group('two_step_run')
def test_a_run_is_pretrained_weights_for_another_task(tmp_path, two_step_run, caplog):
  """An FGVC run (32 x 32 px, 4 classes) loads into a Re-ID model (32 x 16 px, 6 identities):
  backbone and GLCA block from the run's newest checkpoint, positions resized 4x4 -> 4x2, the
  task heads left as initialised; what a run is not gives one line."""
  from dca_jax import hub, weights  # pylint: disable=g-import-not-at-top
  _, saved = _final_state(two_step_run)
  config = tiny_reid_config(pretrained_model=str(two_step_run))
  fresh = _fresh_params(config)
  loaded = train.load_pretrained_params(config, fresh)
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
  assert 'dca_jax run' in hub.banner_line(str(two_step_run))
  # a step folder works the same; a damaged or foreign directory is one line
  step_dir = max((d for d in (two_step_run / 'checkpoints').iterdir() if d.name.isdigit()),
                 key=lambda d: int(d.name))
  assert set(weights.read_run(step_dir)) == set(weights.read_run(two_step_run))
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
