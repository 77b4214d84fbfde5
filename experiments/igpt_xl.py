"""iGPT-XL (60 layers, D 3072, 6.8B parameters) on ImageNet 64x64: batch 64, 2M steps.

Mesh: 64 chips, all fsdp (one 64x64 image per chip), with full remat. The TPU compiler
(`python launch/plan.py --config experiments/igpt_xl.py --topology v5p:4x4x4`) puts 8.55 GiB
on each v5p chip (1.19 GiB state, 7.36 GiB temporaries). More chips: add a tensor axis, e.g.
(1, 64, 2) on 128 (the batch of 64 cannot split further).
"""

from experiments import imagenet_pretrain


def get_config():
  return imagenet_pretrain.get_config("igpt_xl", n_px=64, batch_size=64, total_steps=2_000_000,
                                      lr=3e-4, mesh=(-1, 64, 1), remat="full")
