"""iGPT-S (24 layers, D 512, 76M parameters) on ImageNet 32x32: batch 128, 1M steps.

  python -m launch.train --config experiments/igpt_s.py --workdir gs://bucket/igpt_s

Mesh: pure data parallelism; 8-32 accelerators (v3-8 .. v4-32, or 8 GPUs).
"""

from experiments import imagenet_pretrain


def get_config():
  return imagenet_pretrain.get_config("igpt_s", n_px=32, batch_size=128, total_steps=1_000_000,
                                      lr=3e-3, mesh=(-1, 1, 1), remat="none")
