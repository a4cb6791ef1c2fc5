"""The Cloud TPU memory table of docs/MEMORY.md from the TPU compiler, no TPU: the real train
step (`dca_jax.plan.measure`) for TPU topologies, CUB ViT-B/16 448 px, bf16, effective batch 16
per chip; a row is TOPOLOGY/BATCH_PER_CHIP/REMAT[/fsdp] (default `GRID`), resumable. The venv
(libtpu): `bash tools/accelerator_venvs.sh tpu .venv-tpu`.

  JAX_PLATFORMS=cpu .venv-tpu/bin/python -m tools.tpu_memory_table \
      --rows v5e:2x2/4/off,v4:2x2x1/4/off --out benchmarks/results/plan_tpu.jsonl
  python -m tools.tpu_memory_table --render benchmarks/results/plan_tpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import math

from tools.gpu_memory_table import build_config, done_keys, measure_and_append

GRID = ('v5e:2x2/4/off', 'v5e:2x2/4/nothing_saveable', 'v5e:2x2/16/off',
        'v5e:2x2/16/nothing_saveable', 'v5p:2x2x1/4/off', 'v5p:2x2x1/4/nothing_saveable',
        'v5p:2x2x1/16/off', 'v4:2x2x1/4/off', 'v4:2x2x1/4/nothing_saveable', 'v6e:2x2/4/off',
        'v6e:2x2/4/nothing_saveable', 'v5e:4x4/4/off', 'v5e:4x4/4/off/fsdp')
EFFECTIVE_PER_CHIP = 16


def parse(row: str) -> tuple[str, int, str, bool]:
  parts = row.split('/')
  return parts[0], int(parts[1]), parts[2], len(parts) > 3 and parts[3] == 'fsdp'


def run(args) -> None:
  from dca_jax import plan  # pylint: disable=g-import-not-at-top
  done = done_keys(args.out)
  targets = {}
  for spec in (args.rows.split(',') if args.rows else GRID):
    if spec in done:
      continue
    topology, per_chip, remat, fsdp = parse(spec)
    if topology not in targets:
      targets[topology] = plan.tpu_target(topology)
    target = targets[topology]
    config = build_config(dict(config='cub', backbone='vit_base', precision='bf16', fsdp=fsdp))
    candidate = plan.Candidate(per_chip * target.num_devices, EFFECTIVE_PER_CHIP // per_chip,
                               remat)
    with config.unlocked():
      config.gradient_accumulation_steps = candidate.accumulation
    measure_and_append(config, candidate, target, args.out, key=spec, topology=topology,
                       per_chip_batch=per_chip,
                       host_flops_per_chip=lambda row: row.flops / target.num_devices)


def render(path: str) -> str:
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  lines = ['| topology | chips (hosts) | batch / chip x accumulation | remat | FSDP | GiB / chip '
           '(of available) | TFLOP / chip: compiled (model) | compiler remat | ms / update at '
           'MFU 0.4 |', '|---|---|---|---|---|---|---|---|---|']
  for r in records:
    device, model = r['device_flops'] / 1e12, r['host_flops_per_chip'] / 1e12
    # Windowed einsums (FSDP over hosts) hide their FLOPs from the cost analysis: no figure.
    compiled = f'{device:.2f}' if math.isfinite(device) else 'n/a'
    update = f'{r["update_s"] * 1e3:.0f}' if math.isfinite(r['update_s']) else ''
    lines.append(f'| {r["topology"]} | {r["num_devices"]} ({r["hosts"]}) | '
                 f'{r["per_chip_batch"]} x {r["accumulation"]} | {r["remat"]} | '
                 f'{"yes" if r["fsdp"] else "no"} | {r["memory_gib"]:.2f} ({r["usable_gib"]:.2f})'
                 f'{"" if r["fits"] else ", does not fit"} | {compiled} ({model:.2f}) | '
                 f'{"yes" if r["compiler_remat"] else "no"} | {update} |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rows', default='', help='TOPOLOGY/BATCH_PER_CHIP/REMAT[/fsdp],...')
  parser.add_argument('--out', default='benchmarks/results/plan_tpu.jsonl')
  parser.add_argument('--render', default='', help='print the markdown table of this file')
  args = parser.parse_args()
  if args.render:
    print(render(args.render))
  else:
    run(args)


if __name__ == '__main__':
  main()
