"""Identity-balanced P x K batches for Re-ID training (pure numpy, no TensorFlow).

Every batch of `batch_size` (global) images holds P = batch_size // K identities with K =
`num_instances` images each, laid out identity by identity ([P, K] flattened), so the triplet
loss of every (micro-)batch has K positives per anchor. As in torchreid's
RandomIdentitySampler, per epoch each identity's images are shuffled and cut into chunks of K
(the last incomplete chunk dropped); an identity with fewer than K images gives one chunk of K
drawn with replacement.

Epoch length: with c_i = max(1, n_i // K) chunks for identity i (n_i images),
steps_per_epoch = the largest B with sum_i min(c_i, B) >= B * P, i.e. floor(sum_i c_i / P)
unless one identity has more chunks than there are batches (an identity appears at most once
per batch). About num_train / batch_size, fixed for the dataset (never changes between
epochs), so step s is (epoch s // B, batch s % B) and a stream resumes exactly at any step.

Epoch e is a pure function of (seed, e): identities in a random order, each identity's chunks
contiguous, the first B * P chunks written row-major into a P x B grid and read column by
column. An identity's run of <= B chunks then falls into distinct columns, so no batch holds an
identity twice. Batch order and the order of the groups inside a batch are shuffled too.

Hosts: host `process_index` of `process_count` takes the contiguous slice of every global
batch that starts at process_index * host batch size (batch_size // process_count), so the
union of the hosts' batches is the single-host batch, and identity groups stay whole on a host
whenever the host batch size is a multiple of K.
"""

from __future__ import annotations

import numpy as np

from dca_jax.data.errors import DataError

_SALT = 0x5A3C


class PKSampler:
  """P x K batches over `labels` (int [n], any ids); see the module docstring."""

  def __init__(self, labels, batch_size: int, num_instances: int, seed: int = 0):
    labels = np.asarray(labels).reshape(-1)
    batch_size, instances = int(batch_size), int(num_instances)
    if instances < 1 or batch_size < 1 or batch_size % instances:
      raise DataError(f'config.batch_size={batch_size} is not a positive multiple of '
                      f'config.num_instances={num_instances} (P identities x K images)')
    self.batch_size, self.num_instances = batch_size, instances
    self.num_identities_per_batch = identities_per_batch = batch_size // instances
    self.seed = int(seed)
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind='stable')
    bounds = np.cumsum(np.bincount(inverse, minlength=len(ids)))[:-1]
    self.members = np.split(order.astype(np.int64), bounds)  # image indices of each identity
    if len(ids) < identities_per_batch:
      with_k = sum(len(members) >= instances for members in self.members)
      raise DataError(f'P x K sampling is impossible: the train split has {len(ids)} identities '
                      f'({with_k} of them with {instances} or more images), fewer than the '
                      f'{identities_per_batch} per batch (config.batch_size={batch_size} // '
                      f'config.num_instances={instances}); lower batch_size or num_instances')
    chunks = np.maximum(1, np.asarray([len(members) for members in self.members]) // instances)
    steps = int(chunks.sum()) // identities_per_batch
    while steps > 0 and int(np.minimum(chunks, steps).sum()) < steps * identities_per_batch:
      steps -= 1
    self.steps_per_epoch = steps

  def epoch(self, epoch: int) -> np.ndarray:
    """int64 [steps_per_epoch, batch_size]: the image indices of every global batch."""
    # K, P and B of the module docstring.
    instances, identities, steps = (self.num_instances, self.num_identities_per_batch,
                                    self.steps_per_epoch)
    rng = np.random.default_rng([self.seed & 0xFFFFFFFF, _SALT, int(epoch)])
    groups, count = [], 0
    for identity in rng.permutation(len(self.members)):
      members = self.members[identity]
      if len(members) < instances:
        pick = rng.choice(members, instances, replace=True)
      else:
        pick = rng.permutation(members)[:len(members) // instances * instances]
      groups.append(pick.reshape(-1, instances)[:steps])
      count += len(groups[-1])
      if count >= steps * identities:  # Enough chunks: the other identities sit this epoch out.
        break
    grid = np.concatenate(groups)[:steps * identities].reshape(identities, steps, instances)
    batches = grid.transpose(1, 0, 2)[rng.permutation(steps)]       # [B, P, K]
    inner = np.argsort(rng.random((steps, identities)), axis=1)     # group order per batch
    batches = np.take_along_axis(batches, inner[:, :, None], axis=1)
    return batches.reshape(steps, identities * instances)

  def host_epoch(self, epoch: int, process_index: int = 0, process_count: int = 1):
    """This host's share of epoch `epoch`, flattened in stream order: (indices, positions),
    both int64 [steps_per_epoch * batch_size // process_count]; positions are the global
    positions in the epoch (step * batch_size + slot), unique within an epoch."""
    if self.batch_size % process_count:
      raise DataError(f'config.batch_size={self.batch_size} is not a multiple of the process '
                      f'count {process_count}')
    host_batch = self.batch_size // process_count
    start = process_index * host_batch
    indices = self.epoch(epoch)[:, start:start + host_batch]
    positions = (np.arange(self.steps_per_epoch, dtype=np.int64)[:, None] * self.batch_size +
                 np.arange(start, start + host_batch, dtype=np.int64)[None, :])
    return indices.reshape(-1), positions.reshape(-1)
