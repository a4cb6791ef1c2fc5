"""Models: ViT/DeiT/R50-hybrid backbones (vit.py) and the DCAL model (dcal.py)."""
