"""Models: the ViT backbones (vit.py, resnet.py) and DCAL (dcal.py); `build_model(config)`."""

from __future__ import annotations

import jax.numpy as jnp

from dca_jax import config_lib
from dca_jax.models import dcal, vit


def build_model(config, *, dtype=jnp.float32) -> dcal.DCAL:
  """The DCAL of a config_lib config (the one place knobs become model arguments)."""
  vit_config = vit.get_variant(config.backbone, config_lib.backbone_overrides(config))
  for side in config_lib.input_hw(config):
    vit_config.grid_size(side)  # each side must be a multiple of the backbone stride
  if config.num_sa_layers != vit_config.depth:
    raise ValueError(f'num_sa_layers={config.num_sa_layers} but backbone {config.backbone} has '
                     f'{vit_config.depth} blocks; set backbone_overrides.depth to change L')
  remat = config.remat_policy if config.use_gradient_checkpointing else None
  return dcal.DCAL(config=vit_config, num_classes=config.num_classes,
                   num_glca_layers=config.num_glca_layers, num_pwca_layers=config.num_pwca_layers,
                   top_k_ratio=config.top_k_ratio, glca_input=config.glca_input,
                   glca_pool=config.glca_pool, glca_select=config.glca_select,
                   rollout_layers=config.rollout_layers, rollout_impl=config.rollout_impl,
                   loss_weights_init=config.loss_weights_init,
                   bnneck=bool(config.bnneck),  # resolved by the task: dca_jax/checks.py
                   stochastic_depth_prob=config.stochastic_depth_prob, dtype=dtype,
                   remat_policy=remat, attention_impl=config.attention_impl,
                   pwca_partner_stop_gradient=config.pwca_partner_stop_gradient,
                   classifier_init_std=config.classifier_init_std)
