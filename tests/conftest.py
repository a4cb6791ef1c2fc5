"""Shared test set-up: tiny configs, quiet TensorFlow, repo root importable."""

import os
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Many tests (and their main.py subprocesses, which inherit this) compile the same tiny programs:
# jax's persistent compilation cache makes each later compile a disk read.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'dca_jax_test_jit_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402


def tiny_config(**overrides):
  """A DCAL small enough for a 2-core CPU: width 32, 2 blocks, 32 px, patch 8 (16 patches)."""
  from dca_jax import config_lib
  c = config_lib.base_config()
  c.dataset = c.data_source = 'synthetic'
  c.num_classes = 4
  c.synthetic_num_train, c.synthetic_num_test, c.synthetic_image_size = 32, 20, 32
  c.input_size, c.resize_size = 32, 36
  c.backbone = 'deit_tiny'
  c.backbone_overrides.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8))
  c.num_sa_layers, c.num_pwca_layers, c.top_k_ratio = 2, 2, 0.25
  c.batch_size, c.gradient_accumulation_steps, c.eval_batch_size = 4, 1, 8
  c.num_epochs, c.warmup_epochs = 1, 0.0
  c.learning_rate = 0.05
  c.stochastic_depth_prob = 0.0
  c.use_gradient_checkpointing = False
  c.precision = 'fp32'
  c.log_every_steps = 1
  c.shuffle_buffer = 64
  for k, v in overrides.items():
    c[k] = v
  return c


def tiny_reid_config(**overrides):
  """A tiny Re-ID DCAL on the synthetic Re-ID set: 32 x 16 px (4 x 2 patches of 8), P x K = 2 x 4."""
  c = tiny_config(task='reid', dataset='synthetic_reid', num_classes=6, input_size=32,
                  input_width=16, resize_size=36)
  c.synthetic_num_train, c.synthetic_num_test, c.synthetic_image_size = 48, 60, 32
  c.batch_size, c.num_instances, c.eval_batch_size = 8, 4, 16
  c.crop_padding, c.top_k_ratio = 2, 0.3
  c.optimizer, c.learning_rate, c.lr_reference_batch = 'adamw', 3e-3, 8
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture
def tiny():
  return tiny_config
