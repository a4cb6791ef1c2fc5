"""Runs a few real train steps in a fresh process and saves the final params (subprocess tests).

  python tests/train_worker.py OUT.npz '{"config": {...}}' [--devices N] [--as_hosts H]
      [--coordinator HOST:PORT --num_processes P --process_id I]
XLA_FLAGS must be set before jax is imported, hence a separate process per device count.
--as_hosts H (one process): each batch in the order H hosts assemble it. Host h takes every
H-th image of the epoch's order, so the global batch is [images h::H of this batch for h < H];
one process fed that order sees the very batches (and partners) of an H-process run.
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument('out')
parser.add_argument('overrides')
parser.add_argument('--devices', type=int, default=1)
parser.add_argument('--coordinator', default='')
parser.add_argument('--num_processes', type=int, default=0)
parser.add_argument('--process_id', type=int, default=-1)
parser.add_argument('--steps', type=int, default=3)
parser.add_argument('--as_hosts', type=int, default=1)
args = parser.parse_args()
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from conftest import tiny_config  # noqa: E402
from flax import traverse_util  # noqa: E402

from dca_jax import distributed, train, xla_cpu  # noqa: E402

distributed.initialize_multihost(args.coordinator, args.num_processes, args.process_id)
config = tiny_config(**json.loads(args.overrides))
trainer = train.Trainer(config, os.path.dirname(os.path.abspath(args.out)))
init = jax.device_get(trainer.state.params)
batches = trainer.input.train_iter(start_step=0)
order = np.concatenate([np.arange(h, trainer.input.host_batch_size, args.as_hosts)
                        for h in range(args.as_hosts)])
for _ in range(args.steps):
  batch = distributed.global_batch({k: v[order] for k, v in next(batches).items()},
                                   trainer.batch_sharding)
  trainer.state, metrics = trainer.train_step(trainer.state, batch)
params = jax.device_get(trainer.state.params)
flat = traverse_util.flatten_dict(params, sep='/')
flat.update({'init:' + k: v for k, v in traverse_util.flatten_dict(init, sep='/').items()})
np.savez(args.out, **{k: np.asarray(v) for k, v in flat.items()})
trainer.checkpointer.close()
sharded = sum(not leaf.sharding.is_fully_replicated
              for leaf in jax.tree.leaves(trainer.state.params))
hlo = trainer.train_step.lower(trainer.state, batch).compile().as_text()  # the cached executable
print(json.dumps({'devices': jax.device_count(), 'processes': jax.process_count(),
                  'sharded_param_leaves': sharded, 'all_gathers': hlo.count('all-gather('),
                  'dots': xla_cpu.dots_library(), 'ynn_fusions': hlo.count('__ynn_fusion'),
                  'loss': float(metrics['loss'])}))
