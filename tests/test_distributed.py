"""Several devices and hosts: 8 simulated devices against 1 (replicated and FSDP), no key/value
all-gather for per-device PWCA partners, two jax.distributed processes on localhost against one,
a SIGTERM on one host stopping every host after one save."""

import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (
  ROOT,
  assert_same_params,
  count_build,
  load_npz,
  main_cmd,
  subprocess_env,
  tiny_config,
  train_worker_cmd,
)

from dca_jax import config_lib


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory):
  """3 steps on 1 device: the reference the 8-device runs and the 2-process run are compared
  with. Its batches are put in the order 2 hosts assemble them (`--as_hosts 2`)."""
  count_build('test_distributed.one_device_run')
  overrides = dict(batch_size=8, num_pwca_layers=2, stochastic_depth_prob=0.1,
                   pwca_partners='global')
  cmd, out = train_worker_cmd(tmp_path_factory.mktemp('one'), 'd1', overrides, devices=1, steps=3,
                     as_hosts=2)
  r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return overrides, load_npz(out)


@pytest.mark.slow
@pytest.mark.parametrize('fsdp', [False, True])
def test_eight_devices_match_one_device(tmp_path, fsdp, one_device_run):
  # the same pairing on 8 devices as on 1: partners drawn over the global batch
  overrides, one = one_device_run
  cmd, out = train_worker_cmd(tmp_path, 'd8', dict(overrides, fsdp=fsdp), devices=8, steps=3, as_hosts=2)
  r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  # the trainer's step is compiled with the CPU's dots library (dca_jax/xla_cpu.py)
  assert (report['ynn_fusions'] == 0) == (report['dots'] == 'eigen'), report
  # fsdp: the kernels really are split over the 8 devices (else everything is replicated)
  assert (report['sharded_param_leaves'] > 5) if fsdp else report['sharded_param_leaves'] == 0
  if not fsdp:  # replicated params: the only all-gather is of the partners' keys/values
    assert report['all_gathers'] > 0, report
  _assert_same_training(one, load_npz(out), overrides)


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


@pytest.mark.slow
def test_per_device_pwca_partners_gather_no_activations_across_devices(tmp_path):
  """8 simulated devices, 2 images each: with partners drawn within each device's share the
  compiled train step moves nothing between devices but the gradients' all-reduce (no
  all-gather, all-to-all or collective-permute; drawn over the global batch, they are
  all-gathered: test_eight_devices_match_one_device[False] checks that), and two steps give
  the params of the same two steps on one device with the same 8 partner groups."""
  r = subprocess.run([sys.executable, '-c', _COLLECTIVES, ROOT, str(tmp_path / 'w')], env=subprocess_env(),
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


@pytest.mark.slow
def test_two_processes_on_localhost_train_as_one_process(tmp_path, one_device_run):
  """2 processes of 1 device, each feeding its own host's share, against one process fed the
  same global batches (the fixture): both hosts feeding one shard, or a shard fed twice, fails."""
  overrides, one = one_device_run
  port = _free_port()
  procs, outs = [], []
  for pid in range(2):
    cmd, out = train_worker_cmd(tmp_path, f'p{pid}', overrides, steps=3,
                       coordinator=f'localhost:{port}', num_processes=2, process_id=pid)
    procs.append(subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
    outs.append(out)
  results = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    results.append(json.loads(stdout.strip().splitlines()[-1]))
  assert [r['processes'] for r in results] == [2, 2]
  a, b = load_npz(outs[0]), load_npz(outs[1])
  assert_same_params(a, b, atol=0)  # replicated: the hosts hold one copy
  _assert_same_training(one, a, overrides)


@pytest.mark.slow
def test_sigterm_on_one_host_stops_every_host_after_one_save(tmp_path):
  """The save is collective: a SIGTERM that reaches only host 1 must stop host 0 too."""
  port = _free_port()
  procs = [subprocess.Popen(main_cmd(tmp_path, '--config.max_steps=400', '--config.num_epochs=50',
                                  '--config.save_every_steps=3',
                                  f'--coordinator_address=localhost:{port}', '--num_processes=2',
                                  f'--process_id={pid}'),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


_COLLECTIVES = r"""
import json, os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], 'tests')]
import jax
from conftest import tiny_config
from dca_jax import distributed, train, train_step, xla_cpu
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
ref_step = jax.jit(train_step.make_train_step(trainer.model, trainer.tx, config, dtype=trainer.dtype,
                                         rng=jax.random.split(jax.random.key(config.seed))[1],
                                         num_devices=8),
                   compiler_options={'xla_backend_optimization_level': 0,  # 2 steps: compile less
                                     **(xla_cpu.compiler_options() or {})})  # the trainer's dots
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


def test_a_cloud_tpu_vm_is_told_by_its_pci_bus(tmp_path):
  """Google's PCI vendor id on the bus means TPU chips (jax.distributed then finds the slice);
  this machine's own bus has none."""
  from dca_jax import distributed  # pylint: disable=g-import-not-at-top
  for name, vendor in (('0000:00:04.0', '0x1ae0'), ('0000:00:05.0', '0x8086')):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'vendor').write_text(vendor + '\n')
  assert distributed.on_cloud_tpu_vm(str(tmp_path))
  (tmp_path / '0000:00:04.0' / 'vendor').write_text('0x10de\n')
  assert not distributed.on_cloud_tpu_vm(str(tmp_path))
  assert not distributed.on_cloud_tpu_vm()
