"""iGPT-XL (60 layers, D 3072, 6.8B parameters) on ImageNet 64x64: batch 64, 2M steps.

Mesh: 64 chips, all fsdp (one 64x64 image per chip: the state is split 64 ways and each chip
keeps one image's activations), with full remat. Check a slice before renting it:
`python launch/plan.py --config experiments/igpt_xl.py --topology v5p:4x4x4`
(docs/performance.md, "Plans"). More chips: add a tensor axis, e.g. (1, 64, 2) on 128 (the
batch of 64 cannot split further).
"""

from experiments import imagenet_pretrain


def get_config():
  return imagenet_pretrain.get_config("igpt_xl", n_px=64, batch_size=64, total_steps=2_000_000,
                                      lr=3e-4, mesh=(-1, 64, 1), remat="full")
