r"""Linear probes on ImageNet as in the paper: every layer, SGD (momentum 0.9, cosine) streamed
from bfloat16 feature shards; lr and L2 chosen on 4% of train held out, top-1 on validation.

  python launch/probe.py --config experiments/probe_imagenet.py:32 --workdir gs://B/igpt_l
  python launch/probe.py --config experiments/probe_imagenet.py:64 --workdir gs://B/igpt_xl

The argument picks the resolution (tfds `imagenet_resized/32x32` or `/64x64`, which must match
the checkpoint's n_px). On a pod, start the same command on every host (docs/evaluation.md):
each extracts its own slice of both splits into the workdir, and the probe trains data parallel
over every chip. A local image-folder tree (`root/train/<class>/*`, `root/validation/<class>/*`)
stands in with `--config.data.name=root`.
"""

from experiments import probe_base


def get_config(n_px: str = "32"):
  if n_px not in ("32", "64"):
    raise ValueError(f"probe_imagenet takes 32 or 64 (the checkpoint's n_px), not {n_px!r}")
  c = probe_base.get_config()
  c.data = dict(name=f"imagenet_resized/{n_px}x{n_px}", train_split="train",
                eval_split="validation")
  c.mesh = (1, -1, 1)  # parameters split over every chip: iGPT-L and XL fit 16 GB chips
  c.batch_size = 1024
  # One iGPT-L layer of 1.28M images is 3.9 GB in bfloat16; a sweep of its 49 taps 193 GB.
  c.feature_dtype = "bfloat16"
  c.solver = "sgd"
  c.val_fraction = 0.04  # the paper's held-out 4% of train
  c.l2s = (0.0, 1e-6, 1e-5, 1e-4)
  c.sgd = dict(lrs=(0.1, 0.3, 1.0), epochs=10, batch_size=4096, chunk_rows=8192)
  c.concat_k = 1  # the paper concatenates layers for iGPT-XL only (probe_imagenet_xl.py)
  return c
