"""The memory planner (dca_jax/plan/) on the CPU backend, its TPU entry, and the cuDNN padding of
attention.

The planner's GPU use (deviceless compiles for NVIDIA targets) needs the CUDA wheels, which the
suite does not install; the same code runs here against XLA:CPU's buffer assignment, which is
enough to check its logic: the real train step is compiled per candidate, the bytes follow the
batch, the recommendation is the brute-force optimum, and `auto_batch` trains with it.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_build, tiny_config

from dca_jax import plan
from dca_jax.models import vit


# --- cuDNN attention at odd token counts: the padding and masking logic ----------------------
@pytest.mark.parametrize('num_q,num_kv', [(5, 5), (1, 5), (5, 10), (3, 7), (6, 6)])
def test_padded_fused_attention_equals_unpadded(num_q, num_kv):
  """785 tokens (448 px) are odd; cuDNN trains on even lengths only, so the fused path pads
  queries and keys and masks the padded keys. The same call with XLA's implementation must give
  the explicit softmax attention's values and gradients (q, k, v) at the unpadded lengths."""
  r = np.random.default_rng(num_q * 10 + num_kv)
  q = jnp.asarray(r.normal(size=(2, num_q, 2, 8)), jnp.float32)
  k, v = (jnp.asarray(r.normal(size=(2, num_kv, 2, 8)), jnp.float32) for _ in range(2))
  weights = jnp.asarray(r.normal(size=(2, num_q, 2, 8)), jnp.float32)  # a non-trivial cotangent

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v) * weights).sum()

  def reference(q, k, v):  # numpy-style softmax attention, independent of vit.attention
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)

  fused = lambda q, k, v: vit.fused_attention(q, k, v, implementation='xla')
  np.testing.assert_allclose(jax.jit(fused)(q, k, v), jax.jit(reference)(q, k, v), atol=1e-5)
  for got, want in zip(jax.jit(jax.grad(loss(fused), (0, 1, 2)))(q, k, v),   # one compile each,
                       jax.jit(jax.grad(loss(reference), (0, 1, 2)))(q, k, v)):  # not per op
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_padded_fused_attention_pads_only_odd_lengths():
  """Even lengths go to the kernel as they are; odd ones become even (what cuDNN accepts)."""
  seen = []
  original = jax.nn.dot_product_attention

  def spy(q, k, v, **kw):
    seen.append((q.shape[1], k.shape[1], 'key_value_seq_lengths' in kw))
    return original(q, k, v, **{**kw, 'implementation': 'xla'})

  q = jnp.zeros((1, 785, 1, 8)); kv = jnp.zeros((1, 1570, 1, 8))
  jax.nn.dot_product_attention = spy
  attend = lambda q, k, v: jax.eval_shape(  # traced, not run: the shapes are what is checked
      lambda q, k, v: vit.fused_attention(q, k, v, implementation='xla'), q, k, v)
  try:
    attend(q, kv, kv)                                       # PWCA: 785 x (785 + 785)
    attend(q, q, q)                                         # SA: 785 x 785
    attend(kv[:, :784], kv[:, :784], kv[:, :784])
  finally:
    jax.nn.dot_product_attention = original
  assert seen == [(786, 1570, True), (786, 786, True), (784, 784, False)]


# --- the GPU spec reader ----------------------------------------------------------------------
_SPEC = """gpu_device_info {
  core_count: 132
  device_memory_size: 84942979072
  matrix_unit_description {
    rate_infos { key: 10 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 512 } }
    rate_infos { key: 11 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 256 } }
    rate_infos { key: 16 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 512 } }
  }
  model_str: "sm_9.0a with 84942979072B RAM"
}
"""


def test_spec_peak_flops_match_the_published_dense_figures():
  """An H100 SXM's spec (132 SMs, 4 tensor cores each, 1.83 GHz boost): NVIDIA's datasheet
  gives 989.4 TFLOP/s dense BF16/FP16 and 494.7 TF32; the spec's rates must give the same."""
  spec = plan.read_gpu_spec(_SPEC)
  assert spec['memory_bytes'] == 84942979072
  assert spec['peak_flops']['bf16'] == pytest.approx(989.4e12, rel=2e-3)
  assert spec['peak_flops']['fp16'] == pytest.approx(989.4e12, rel=2e-3)
  assert spec['peak_flops']['fp32'] == pytest.approx(494.7e12, rel=2e-3)
  with pytest.raises(plan.PlanError, match='not an XLA GPU target spec'):
    plan.read_gpu_spec('gpu_device_info { }')


@pytest.mark.parametrize('major,cores,clock,precision,published', [
    (7, 80, 1.53, 'fp16', 125e12),    # V100 SXM2: 125 TFLOP/s fp16 tensor
    (8, 108, 1.41, 'bf16', 312e12),   # A100 SXM: 312 TFLOP/s bf16 dense
    (8, 108, 1.41, 'fp32', 156e12)])  # A100 SXM: 156 TFLOP/s TF32 dense
def test_spec_without_rates_uses_the_architecture(major, cores, clock, precision, published):
  text = (f'gpu_device_info {{\n  core_count: {cores}\n  clock_rate_ghz: {clock}\n'
          f'  device_memory_size: 17000000000\n  cuda_compute_capability {{\n    major: {major}\n'
          '  }\n}\ndnn_version_info {\n  major: 9\n}\n')
  spec = plan.read_gpu_spec(text)
  assert spec['peak_flops'][precision] == pytest.approx(published, rel=5e-3)
  assert ('bf16' in spec['peak_flops']) == (major >= 8)  # Volta has no bf16 units


def test_candidates_respect_devices_pwca_and_reid_groups():
  c = tiny_config(batch_size=4, gradient_accumulation_steps=4)  # effective 16
  sizes = lambda cands: sorted({x.batch_size for x in cands})
  assert sizes(plan.candidates(c, 1)) == [2, 4, 8, 16]            # PWCA: >= 2 images per device
  assert sizes(plan.candidates(c, 4)) == [8, 16]
  c.pwca_partners = 'global'
  assert sizes(plan.candidates(c, 1)) == [1, 2, 4, 8, 16]
  c.task, c.num_instances = 'reid', 4
  assert sizes(plan.candidates(c, 1)) == [4, 8, 16]              # whole P x K groups
  assert all(x.batch_size * x.accumulation == 16 for x in plan.candidates(c, 1))


# --- the plan on the CPU backend ---------------------------------------------------------------
@pytest.fixture(scope='module')
def cpu_plan(tmp_path_factory):
  """`--mode plan`'s function on the attached CPU for the tiny DCAL, effective batch 4."""
  count_build('test_plan.cpu_plan')
  workdir = tmp_path_factory.mktemp('plan')
  config = tiny_config(batch_size=4, gradient_accumulation_steps=1)
  records = plan.run_plan(config, str(workdir), [])
  with open(workdir / 'plan.jsonl') as f:
    assert [json.loads(line) for line in f] == json.loads(json.dumps(records, default=float))
  return config, records


def _by(records):
  return {(r['batch_size'], r['remat']): r for r in records}


@pytest.mark.slow
def test_plan_compiles_every_candidate_and_bytes_follow_the_batch(cpu_plan):
  _, records = cpu_plan
  rows = _by(records)
  assert set(rows) == {(b, r) for b in (2, 4) for r in plan.REMAT_LEVELS}
  for remat in plan.REMAT_LEVELS:
    small, large = rows[2, remat], rows[4, remat]
    assert not small['error'] and small['accumulation'] == 2 and large['accumulation'] == 1
    # the activations double with the batch; the state (arguments) does not
    assert large['temp_bytes'] > 1.3 * small['temp_bytes']
    assert large['memory_bytes'] == (large['argument_bytes'] + large['output_bytes']
                                     - large['alias_bytes'] + large['temp_bytes'])
    # the donated state is aliased: counted once
    assert large['alias_bytes'] > 0.9 * (large['output_bytes'] - 1024)
    # FLOPs per micro-step double with the batch, and remat adds recomputation
    assert large['flops'] == pytest.approx(2 * small['flops'], rel=0.05)
  assert rows[4, 'nothing_saveable']['flops'] > 1.1 * rows[4, 'off']['flops']
  assert sum(r['recommended'] for r in records) == 1
  assert _by([r for r in records if r['recommended']]).keys() == {(4, 'off')}


def _brute_force(records, limit):
  """The fastest fitting row written out directly: least FLOPs per effective batch; within 1 %
  the larger physical batch."""
  fitting = [r for r in records if r['memory_bytes'] <= limit]
  if not fitting:
    return None
  best = min(r['flops'] * r['accumulation'] for r in fitting)
  near = [r for r in fitting if r['flops'] * r['accumulation'] <= best * 1.01]
  return max(near, key=lambda r: r['batch_size'])


@pytest.mark.slow
def test_recommendation_is_the_brute_force_optimum_at_every_memory_limit(cpu_plan):
  config, records = cpu_plan
  target = plan.attached_target()
  sizes = sorted({r['memory_bytes'] for r in records})
  for limit in [sizes[0] - 1] + sizes:
    rows = []
    for r in records:
      row = plan.Row(plan.Candidate(r['batch_size'], r['accumulation'], r['remat']),
                     memory_bytes=r['memory_bytes'], flops=r['flops'])
      rows.append(plan.judge(row, dataclasses.replace(target, memory_bytes=limit), 'fp32', 0.0,
                             0.4))
    got, want = plan.recommend(rows), _brute_force(records, limit)
    if want is None:
      assert got is None
    else:
      assert (got.candidate.batch_size, got.candidate.remat) == (want['batch_size'],
                                                                 want['remat'])


@pytest.mark.slow
def test_auto_batch_trains_with_the_planned_configuration(cpu_plan, tmp_path, capsys):
  """main.py with auto_batch and a memory budget that the largest batch exceeds: the search
  (ranked by FLOPs, compiling until one fits) must land on the brute-force choice, say so,
  and train with it (config.json records it)."""
  _, records = cpu_plan
  largest = max(r['memory_bytes'] for r in records if r['batch_size'] == 4)
  limit = max(r['memory_bytes'] for r in records if r['batch_size'] == 2)
  assert limit < largest
  want = _brute_force(records, limit)
  # what main.py's train mode does with auto_batch (in this process: its compiles are cached)
  from dca_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(auto_batch=True, plan_memory_gb=limit / 2**30, plan_memory_margin=0.0,
                       max_steps=2, eval_frequency=100)
  train.train_and_evaluate(config, str(tmp_path))  # the train mode plans itself (auto_batch)
  stdout = capsys.readouterr().out
  line = [s for s in stdout.splitlines() if s.startswith('auto_batch:')]
  assert line, stdout[-2000:]
  assert f'batch_size={want["batch_size"]} gradient_accumulation_steps={want["accumulation"]}' \
      in line[0]
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  assert (saved['batch_size'], saved['gradient_accumulation_steps']) == (
      want['batch_size'], want['accumulation'])
  assert f'Physical batch size: {want["batch_size"]} (auto_batch' in stdout


@pytest.mark.slow
def test_nothing_fits_is_one_clear_line(cpu_plan):
  """Below the smallest candidate nothing is recommended, and the line says what to change."""
  config, records = cpu_plan
  target = dataclasses.replace(plan.attached_target(), memory_bytes=1024)
  rows = [plan.judge(plan.Row(plan.Candidate(r['batch_size'], r['accumulation'], r['remat']),
                              memory_bytes=r['memory_bytes'], flops=r['flops']),
                     target, 'fp32', 0.1, 0.4) for r in records]
  assert plan.recommend(rows) is None
  line = plan.summary(None, target, config, 0.1)
  assert 'nothing fits effective batch 4' in line and '\n' not in line


def test_bad_spec_is_one_clear_line(tmp_path):
  with pytest.raises(plan.PlanError, match='cannot read the GPU target spec'):
    plan.gpu_target(str(tmp_path / 'missing.txtpb'))
  (tmp_path / 'bad.txtpb').write_text('hello')
  with pytest.raises(plan.PlanError, match='not an XLA GPU target spec'):
    plan.gpu_target(str(tmp_path / 'bad.txtpb'))


# --- the TPU entry ---------------------------------------------------------------------------
@pytest.mark.parametrize('name,gen', [('v5e:2x2', 'v5e'), ('v5litepod-16', 'v5e'),
                                      ('v4:2x2x1', 'v4'), ('v5p:2x2x1', 'v5p'),
                                      ('v6e:2x2', 'v6e'), ('TPU v5 lite', 'v5e'),
                                      ('TPU v6 lite', 'v6e'), ('TPU v4', 'v4'), ('TPU v5p', 'v5p')])
def test_tpu_generation_from_topologies_and_device_kinds(name, gen):
  from dca_jax.plan import tpu  # pylint: disable=g-import-not-at-top
  assert tpu.generation(name) == gen
  assert tpu.attached_peak(name) == {'bf16': tpu.PEAK_BF16[gen]}


def test_tpu_settings_the_platform_cannot_run_are_one_line():
  config = tiny_config(precision='fp16')
  target = dataclasses.replace(plan.attached_target(), platform='tpu', name='v5e:2x2')
  with pytest.raises(plan.PlanError, match=r"v5e:2x2: config.precision='fp16' on a TPU.*bf16"):
    plan.resolve_precision(config, target)
  with pytest.raises(plan.PlanError, match=r"attention_impl='cudnn'.*on a TPU use"):
    plan.resolve_precision(tiny_config(attention_impl='cudnn'), target)
  assert plan.resolve_precision(tiny_config(precision='auto'), target) == 'bf16'


def test_compiled_flops_above_the_model_say_the_compiler_rematerialised():
  """A target whose executables report FLOPs (TPU): the row keeps them, times with them, and
  flags the compiler's own remat when they exceed the model's share of the device."""
  target = dataclasses.replace(plan.attached_target(), platform='tpu', reports_flops=True,
                               peak_flops={'bf16': 100e12}, devices=jax.devices()[:1] * 4)
  cand = plan.Candidate(16, 1, 'off')
  full = int(0.95 * target.memory_bytes)
  plain = plan.judge(plan.Row(cand, memory_bytes=full, flops=4e12, device_flops=1.0e12), target,
                     'bf16', 0.1, 0.5)
  assert not plain.compiler_remat and plain.step_s == pytest.approx(1e12 / 50e12)
  extra = plan.judge(plan.Row(cand, memory_bytes=full, flops=4e12, device_flops=1.2e12), target,
                     'bf16', 0.0, 0.5)
  assert extra.compiler_remat and extra.step_s == pytest.approx(1.2e12 / 50e12)
  assert 'the compiler rematerialised' in plan.format_row(extra, target)
  padded = plan.judge(plan.Row(cand, memory_bytes=1, flops=4e12, device_flops=1.2e12), target,
                      'bf16', 0.1, 0.5)  # far from the limit: padding, not remat
  assert not padded.compiler_remat


@pytest.mark.slow  # compiles the real train step for the plan, as the cpu_plan group does
def test_a_cpu_target_through_the_registry_reports_compiled_flops():
  """The registry's attached entry, marked as reporting its executables' FLOPs (as TPUs do),
  measures the real train step on this host: the compiled FLOPs are read (XLA:CPU's fusions
  count some element-wise work twice: within 15 % of the model's) and judged against them."""
  from dca_jax.plan import registry  # pylint: disable=g-import-not-at-top
  [target] = registry.targets([])
  target = dataclasses.replace(target, reports_flops=True, peak_flops={'fp32': 1e12})
  config = tiny_config(batch_size=2, gradient_accumulation_steps=1)
  row = plan.judge(plan.measure(config, plan.Candidate(2, 1, 'off'), target, 'fp32'), target,
                   'fp32', 0.1, 0.4)
  assert not row.error and row.memory_bytes > 0
  assert row.device_flops == pytest.approx(row.flops, rel=0.15)
  assert not row.compiler_remat  # far from the memory limit
  assert row.step_s == pytest.approx(row.device_flops / (1e12 * 0.4))


def test_tpu_target_without_libtpu_is_one_line():
  """Where libtpu is installed (jax[tpu]) the topology compiles; here, without it, the line
  says what to install."""
  pytest.importorskip('jax', minversion='0.4')
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    with pytest.raises(plan.PlanError, match=r'cannot compile for TPU v5e:2x2.*jax\[tpu\]'):
      plan.tpu_target('v5e:2x2')
    return
  target = plan.tpu_target('v5e:2x2')
  assert target.num_devices == 4 and target.platform == 'tpu' and target.reports_flops
  assert 15 * 2**30 < target.memory_bytes < 16 * 2**30  # the compiler's available HBM


def test_collectives_are_counted_once_per_channel():
  """The TPU compiler's async collective fusion repeats an all-gather (same channel_id) in each
  fusion that takes a slice of it: counted once; an instruction without a channel counts."""
  hlo = '\n'.join([
      '  %all-gather.600 = f32[1,785,768]{1,2,0} all-gather(%p0), channel_id=1215, dimensions={2}',
      '  %all-gather.602 = f32[1,785,768]{1,2,0} all-gather(%p1), channel_id=1215, dimensions={2}',
      '  %all-gather.7 = bf16[16,8]{1,0} all-gather(%p2), channel_id=3, dimensions={0}',
      '  ROOT %all-reduce.1 = f32[10]{0} all-reduce(%p3), to_apply=%add',
      '  %all-reduce.2 = f32[10]{0} all-reduce(%p4), to_apply=%add'])
  assert plan.collective_bytes(hlo) == {'all-gather': 785 * 768 * 4 + 16 * 8 * 2,
                                        'all-reduce': 2 * 10 * 4}
