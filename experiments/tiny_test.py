r"""A seconds-long run for tests and smoke checks: 4x4 images, 16 colours, 2 layers of width 32.

  python -m launch.train --config experiments/tiny_test.py --workdir /tmp/igpt_smoke \
    --config.data.name=path/to/images.npz
"""

import os

import ml_collections

_LOCAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                      "cifar10", "train.npz")


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(name=os.path.normpath(_LOCAL) if os.path.exists(_LOCAL) else "cifar10",
                train_split="train[:48]", eval_split="train[48:64]", augment="none")
  c.palette = ""
  c.model = dict(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=16)
  c.mesh = (-1, 1, 1)

  c.total_steps = 8
  c.batch_size = 8
  c.accum_steps = 1
  c.lr = 1e-2
  c.warmup_steps = 2
  c.grad_clip = 0.0

  c.log_every = 1
  c.eval_every = 4
  c.eval_batches = 0
  c.checkpoint_every = 2
  c.keep_checkpoints = 20
  c.sample_every = 0
  return c
