"""Devices and hosts: multi-host start-up, the data-parallel mesh, global batches."""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dca_jax.errors import ConfigError

DATA_AXIS = 'data'


def initialize_multihost(coordinator_address: str = '', num_processes: int = 0,
                         process_id: int = -1) -> None:
  """Calls `jax.distributed.initialize` when launched as several processes.

  Explicit flags win; otherwise the cluster environment (SLURM, a Cloud TPU VM's slice, or the
  JAX_COORDINATOR_* variables) is auto-detected by jax. A single process without any of these
  does nothing.
  """
  env = os.environ
  if coordinator_address or 'JAX_COORDINATOR_ADDRESS' in env:
    # CPU cross-process collectives (tests, CPU clusters) need gloo; GPU/TPU ignore this. Asking
    # jax for its backend here would start it, which initialize() forbids.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    kwargs = {}
    if coordinator_address:
      kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                    process_id=process_id)
    jax.distributed.initialize(**kwargs)
  elif 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
  elif on_cloud_tpu_vm() and env.get('JAX_PLATFORMS', '') in ('', 'tpu'):
    # A TPU VM: jax finds the slice's hosts from the VM's metadata (a pod slice runs the same
    # command on every host); a host that belongs to no multi-host slice stays single.
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError):
      pass


GOOGLE_PCI_VENDOR = '0x1ae0'  # Cloud TPU chips on a TPU VM's PCI bus


def on_cloud_tpu_vm(pci_devices: str = '/sys/bus/pci/devices') -> bool:
  """Whether this host has Cloud TPU chips (read from sysfs: no jax backend is started)."""
  for vendor in glob.glob(os.path.join(pci_devices, '*', 'vendor')):
    try:
      with open(vendor) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def make_mesh() -> Mesh:
  """A 1-D data-parallel mesh over every device of every host."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_sharding(mesh: Mesh, shape, fsdp: bool, min_size: int = 1024) -> NamedSharding:
  """Replicated, or with `fsdp` the largest axis divisible by the device count sharded over
  'data' (params, Adam moments and the accumulated gradient alike; XLA all-gathers for compute
  and reduce-scatters the gradients). Small leaves (biases, norms, scalars) stay replicated."""
  n = mesh.devices.size
  if fsdp and n > 1 and int(np.prod(shape, dtype=np.int64)) >= min_size:
    axes = [i for i in np.argsort(shape)[::-1] if shape[i] % n == 0]
    if axes:
      spec = [None] * len(shape)
      spec[int(axes[0])] = DATA_AXIS
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def check_batch_divisible(batch_size: int, what: str = 'batch_size') -> None:
  n = jax.device_count()
  if batch_size % n:
    raise ValueError(f'config.{what}={batch_size} is not divisible by the {n} devices; '
                     f'use a multiple of {n}')


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """This host's share of the batch -> one global jax.Array per field, sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def check_platform(precision: str, attention_impl: str, platform: str) -> None:
  """One line for a setting the platform cannot run: fp16 on a TPU (its matrix units compute in
  bf16; fp16 has none) and cuDNN's fused attention anywhere but on an NVIDIA GPU's bf16/fp16
  (on a CPU in fp32 the XLA attention runs instead, as before)."""
  if platform == 'tpu' and precision == 'fp16':
    raise ConfigError("config.precision='fp16' on a TPU: TPUs compute in bf16 and have no fp16 "
                      "units; use --config.precision=bf16 (or auto, which is bf16 there)")
  if platform == 'tpu' and attention_impl == 'cudnn':
    raise ConfigError("config.attention_impl='cudnn' is NVIDIA's fused attention; on a TPU use "
                      '--config.attention_impl=xla')


DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16, 'fp16': jnp.float16}  # precision -> dtype


def compute_dtype(precision: str, attention_impl: str = 'xla', platform: str | None = None):
  """'auto' is fp32 on CPU (no fast half precision there) and bf16 on GPU/TPU; settings the
  platform (default: the attached one; the program compiler names a target's) cannot run are
  one line (`check_platform`)."""
  platform = platform or jax.default_backend()
  check_platform(precision, attention_impl, platform)
  if precision == 'auto':
    precision = 'fp32' if platform == 'cpu' else 'bf16'
  return DTYPES[precision], precision
