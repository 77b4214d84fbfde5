r"""README demo: a small iGPT on real CIFAR-10 at 8x8, minutes on a 2-core CPU.

  python -m launch.train --config experiments/cifar10_tiny.py --workdir /tmp/igpt_tiny

Data: `base.cifar10()` (the local file beside the checkout, else tfds). train[:40000] trains,
train[40000:] is held out: the probe (experiments/probe_cifar10_tiny.py) tests on those 10,000
images. The palette is fitted from the training images into the workdir on the first run.
"""

from experiments import base


def get_config():
  c = base.get_config()
  # No augmentation, as the paper pretrains (its CIFAR pad-crop-flip is for fine-tuning): at 8x8
  # the 1-pixel reflect pad mirrors up to 15 of 64 pixels; with it the held-out loss was 0.14 -
  # 0.23 nats worse at the same steps and the best layer probed 38.47% instead of 39.58%.
  c.data = dict(name=base.cifar10(), train_split="train[:40000]", eval_split="train[40000:]",
                augment="none")
  # 8x8 rather than 16x16: a quarter of the tokens per image, so the same CPU minutes show the
  # model four times as many images; raw pixels probe about the same at 8, 12 and 16 px
  # (README, "Evaluation"). 3 wide layers: the probe peaks mid-depth or at the top here.
  c.model.update(n_px=8, n_layer=3, n_embd=192, n_head=6, attention="auto")
  # One full cosine over 2.9M tokens (44,800 images), as many tokens as the 16x16 demo had.
  c.total_steps = 700
  c.batch_size = 64
  c.lr = 3e-3
  c.warmup_steps = 70
  c.grad_clip = 1.0

  c.log_every = 50
  c.eval_every = 175
  c.eval_batches = 20  # 1280 of the 10,000 held-out images: enough for a stable loss
  c.checkpoint_every = 350
  c.keep_checkpoints = 2
  c.sample_every = 700

  # The probe at every other eval step (about 25 s each, 13% of the wall time on the demo), on
  # a small labelled subset.
  c.evals.probe.every = 350
  c.evals.probe.train_split = "train[:2000]"
  c.evals.probe.eval_split = "train[40000:42000]"
  c.evals.probe.reading = "ln1_2x2"  # as experiments/probe_cifar10_tiny.py reads
  # The L2 is chosen on 200 images here: when it was picked by their accuracy, 1.0 in the grid
  # got picked by that noise and the held-out figure fell from 39.5% to 36.2% on the demo
  # checkpoint; 1e-4 ran to the cap.
  c.evals.probe.l2s = (1e-3, 1e-2, 1e-1)
  return c
