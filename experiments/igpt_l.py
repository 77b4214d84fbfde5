"""iGPT-L (48 layers, D 1536, 1.4B parameters) on ImageNet 32x32: batch 128, 1M steps.

Mesh: fsdp 16 x tensor 2 within slices, data parallel across them (config.dcn_mesh); 32-128
chips.
"""

from experiments import imagenet_pretrain


def get_config():
  return imagenet_pretrain.get_config("igpt_l", n_px=32, batch_size=128, total_steps=1_000_000,
                                      lr=5e-4, mesh=(-1, 16, 2), remat="full")
