"""The GPU entry of the target registry: an NVIDIA card from an XLA GPU target spec, compiled
for without the card ("deviceless": the jax[cuda12] wheels, JAX_PLATFORMS=cpu).

What is GPU-only lives here: the spec's fields, the card's dense peak per precision (from the
spec's matrix units, else the architecture's tensor-core rate), JAX's pool fraction of the card,
the `--topology` meaning (hosts x 1 x GPUs per host) and the count of cuDNN fused-attention calls
in a compiled step.
"""

from __future__ import annotations

import os
import re

import jax

from dca_jax.errors import PlanError
from dca_jax.plan.targets import Target, first_line

# XLA's PrimitiveType numbers in the spec's matrix_unit_description: precision -> type.
_SPEC_TYPES = {'fp16': 10, 'fp32': 11, 'bf16': 16}
# Dense matrix FLOPs per clock per SM by compute-capability major, for specs without rates
# (NVIDIA's architecture whitepapers): Volta 8 tensor cores x 64 FMA (fp16; no bf16; fp32 on the
# 64 FP32 units), Ampere 4 x 256 FMA (fp16/bf16; fp32 as TF32 at half), Hopper 4 x 512 FMA.
_DENSE_FLOPS_PER_CLOCK_PER_SM = {7: {'fp16': 1024, 'fp32': 128},
                                 8: {'fp16': 2048, 'bf16': 2048, 'fp32': 1024},
                                 9: {'fp16': 4096, 'bf16': 4096, 'fp32': 2048}}


def read_gpu_spec(text: str) -> dict:
  """The fields the planner needs from an XLA GPU target spec (text proto)."""
  def field(name, cast=int):
    m = re.search(rf'\b{name}:\s*"?([^"\n]+)"?', text)
    return cast(m.group(1)) if m else None

  cores, memory = field('core_count'), field('device_memory_size')
  if not cores or not memory:
    raise PlanError('not an XLA GPU target spec: core_count / device_memory_size missing')
  peak = {}
  matrix = text.split('matrix_unit_description', 1)[-1].split('}\n  }', 1)[0]
  for key, clock, units, ops in re.findall(
      r'key:\s*(\d+)\s*value\s*\{\s*clock_rate_ghz:\s*([\d.]+)\s*units_per_core:\s*(\d+)\s*'
      r'ops_per_clock:\s*(\d+)', matrix):
    for precision, type_id in _SPEC_TYPES.items():
      if int(key) == type_id:  # an FMA is two FLOPs
        peak[precision] = 2.0 * cores * int(units) * int(ops) * float(clock) * 1e9
  if not peak:  # older specs carry no matrix rates: the architecture's tensor-core rate x clock
    m = re.search(r'cuda_compute_capability\s*\{\s*major:\s*(\d+)', text)
    clock = field('clock_rate_ghz', float)
    rates = _DENSE_FLOPS_PER_CLOCK_PER_SM.get(int(m.group(1)) if m else -1, {})
    if clock:
      peak = {precision: cores * rate * clock * 1e9 for precision, rate in rates.items()}
  return {'cores': cores, 'memory_bytes': memory, 'peak_flops': peak,
          'model': field('model_str', str) or '', 'platform': field('platform_version', str)}


def pool_fraction() -> float:
  """The share of a GPU's memory JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75
  by default); the train step must fit in that pool."""
  if os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE', '').lower() == 'false':
    return 1.0
  return float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 0.75))


def gpu_target(spec_path: str, topology: str = '1x1x1') -> Target:
  """A deviceless NVIDIA target from an XLA GPU spec file and a topology ('1x1x8': 8 GPUs)."""
  try:
    with open(spec_path) as f:
      text = f.read()
  except OSError as e:
    raise PlanError(f'cannot read the GPU target spec {spec_path}: {e.strerror}') from None
  spec = read_gpu_spec(text)
  if jax.default_backend() != 'cpu':
    raise PlanError('a deviceless GPU plan compiles on the host: run it with JAX_PLATFORMS=cpu')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc('dca_jax_plan', 'cuda', target_config=text,
                                        topology=topology)
  except Exception as e:  # pylint: disable=broad-except  (missing plugin, bad proto, ...)
    raise PlanError(f'cannot compile for {os.path.basename(spec_path)}: {first_line(e)} (a '
                    'deviceless GPU plan needs the jax[cuda12] wheels of the same jax version)'
                    ) from None
  name = topo.devices[0].device_kind
  if len(topo.devices) > 1:
    name = f'{len(topo.devices)} x {name}'
  return Target(name=name, backend='gpu-deviceless', platform='gpu', devices=tuple(topo.devices),
                memory_bytes=int(spec['memory_bytes'] * pool_fraction()),
                physical_memory_bytes=spec['memory_bytes'], peak_flops=spec['peak_flops'],
                spec=spec_path,
                inspect_hlo=lambda hlo: {'fused_attention': fused_attention_calls(hlo)})




def fused_attention_calls(hlo: str) -> dict:
  """{cuDNN fused-attention custom call: count} of a compiled step's HLO."""
  calls = {}
  for name in re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', hlo):
    calls[name] = calls.get(name, 0) + 1
  return calls
