"""Shared settings of the paper's ImageNet pretraining runs (igpt_s/m/l/xl.py pick the size).

Paper: Adam b1 .9 b2 .95, no weight decay or dropout, linear warm-up for about one epoch then
cosine to zero; batch 128 for 1M steps (S/M/L), batch 64 for 2M (XL); 4% of the ImageNet
training set held out; random short-side resize into [256, 384] and 224 crop, then area
downsampling to n_px. Compute in bfloat16 with float32 parameters, layers scanned.
"""

import ml_collections

from experiments import base

TRAIN_IMAGES = 1_281_167 * 96 // 100


def get_config(preset: str, *, n_px: int, batch_size: int, total_steps: int, lr: float,
               mesh: tuple, remat: str) -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data = dict(name="imagenet2012", data_dir=None, train_split="train[:96%]",
                eval_split="train[96%:]", augment="imagenet", shuffle_buffer=50_000)
  c.palette = "kmeans_centers.npy"  # the released palette (or launch/fit_palette.py output)
  c.model.update(preset=preset, n_px=n_px, dtype="bfloat16", param_dtype="float32",
                 scan_layers=True, remat=remat, attention="auto")
  c.mesh = mesh  # data x fsdp must divide batch_size
  c.total_steps = total_steps
  c.batch_size = batch_size
  c.lr = lr
  c.warmup_steps = int(round(TRAIN_IMAGES / batch_size, -3))  # about one epoch
  c.eval_batches = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5_000
  c.sample_every = 50_000
  return c
