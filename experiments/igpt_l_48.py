"""iGPT-L (48 layers, D 1536, 1.4B parameters) on ImageNet 48x48: the paper's best iGPT-L (65.2%
linear probe on ImageNet). Batch 128, 1M steps, as at 32x32.

  python -m launch.train --config experiments/igpt_l_48.py --workdir gs://bucket/igpt_l_48

T = 2304 tokens: 2.25x the activations of 32x32 and 5x the attention scores. The splash kernel
tiles T in blocks of 384 (kernels.splash_block: 512 does not divide 2304). Mesh as at 32x32:
fsdp 16 x tensor 2 within slices, data parallel across them. Check a slice before renting it:
`python launch/plan.py --config experiments/igpt_l_48.py --topology v5p:4x4x2`
(docs/performance.md, "Plans").
"""

from experiments import imagenet_pretrain


def get_config():
  return imagenet_pretrain.get_config("igpt_l", n_px=48, batch_size=128, total_steps=1_000_000,
                                      lr=5e-4, mesh=(-1, 16, 2), remat="full")
