"""iGPT-XL (60 layers, D 3072, 6.8B parameters) on ImageNet 64x64: batch 64, 2M steps.

Mesh: 64 chips as fsdp 16 x tensor 4 (bench/compile_xl.py compiles this step for 64 fake
devices and reports the per-device memory). More chips: grow the data axis.
"""

from experiments import imagenet_pretrain


def get_config():
  return imagenet_pretrain.get_config("igpt_xl", n_px=64, batch_size=64, total_steps=2_000_000,
                                      lr=3e-4, mesh=(-1, 16, 4), remat="full")
