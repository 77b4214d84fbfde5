"""iGPT-XL (60 layers, D 3072, 6.8B parameters) on ImageNet 64x64: batch 64, 2M steps.

Mesh: 64 chips, all fsdp (one 64x64 image per chip). `python -m bench.compile_xl` compiles this
step for 64 fake devices: 9.0 GiB per device (1.2 GiB state, 7.8 GiB temporaries), against
18.3 GiB for fsdp 16 x tensor 4, which keeps 4 images' activations per chip. More chips: add a
tensor axis, e.g. (1, 64, 2) on 128 (the batch of 64 cannot split further).
"""

from experiments import imagenet_pretrain


def get_config():
  return imagenet_pretrain.get_config("igpt_xl", n_px=64, batch_size=64, total_steps=2_000_000,
                                      lr=3e-4, mesh=(-1, 64, 1), remat="full")
