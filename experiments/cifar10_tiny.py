r"""README demo: a small iGPT on real CIFAR-10 at 16x16, minutes on a 2-core CPU.

  python -m launch.train --config experiments/cifar10_tiny.py --workdir /tmp/igpt_tiny

Data: `base.cifar10()` (the local file beside the checkout, else tfds). train[:45000] trains,
train[45000:] is held out. The palette is fitted from the training images into the workdir on
the first run.
"""

from experiments import base


def get_config():
  c = base.get_config()
  c.data = dict(name=base.cifar10(), train_split="train[:45000]", eval_split="train[45000:]",
                augment="cifar")
  # 3 wide layers rather than 4 x 128: the probe peaks mid-depth, and this shape probed better
  # at its best layer in the same minutes (README, "Evaluation").
  c.model = dict(n_px=16, n_layer=3, n_embd=192, n_head=6, attention="auto")
  # One full cosine over 2.9M tokens fits a few CPU minutes; fewer steps probed lower.
  c.total_steps = 350
  c.batch_size = 32
  c.lr = 3e-3
  c.warmup_steps = 35
  c.grad_clip = 1.0

  c.log_every = 50
  c.eval_every = 175
  c.eval_batches = 40  # 1280 of the 5000 held-out images: enough for a stable loss
  c.checkpoint_every = 175
  c.keep_checkpoints = 2
  c.sample_every = 350
  return c
