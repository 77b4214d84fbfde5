"""iGPT-M (36 layers, D 1024, 455M parameters) on ImageNet 32x32: batch 128, 1M steps.

Mesh: parameters and Adam state split 8 ways (fsdp), the rest data parallel; 32-128 chips.
"""

from experiments import imagenet_pretrain


def get_config():
  return imagenet_pretrain.get_config("igpt_m", n_px=32, batch_size=128, total_steps=1_000_000,
                                      lr=1e-3, mesh=(-1, 8, 1), remat="dots")
