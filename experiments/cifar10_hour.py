r"""An hour of pretraining on a 2-core CPU: 12 layers of width 96 on CIFAR-10 at 16x16.

  python launch/train.py --config experiments/cifar10_hour.py --workdir workdirs/hour
  python launch/probe.py --config experiments/probe_cifar10_tiny.py --workdir workdirs/hour \
      --baselines

Data, held-out split, reading and probe protocol are the README demo's
(experiments/cifar10_tiny.py); the resolution, model and schedule differ. docs/results.md, "An
hour on the CPU", has the measured times and the probe curve (of commit 7881a3e).
"""

from experiments import cifar10_tiny


def get_config():
  c = cifar10_tiny.get_config()
  # 16x16 rather than the demo's 8x8: three 8x8 models (8 x 256 for an hour, 16 x 128 for 31
  # minutes, 6 x 192 for 16) probed 43.2 - 44.8% at their best layer, none peaking mid-depth.
  # 12 layers of width 96 (1.45M parameters), deep enough for a middle and a top, about 0.4
  # steps/s of batch 64 on the 2 cores; 6 layers of width 128 rose to the top.
  c.model.update(n_px=16, n_layer=12, n_embd=96, n_head=3, attention="auto")
  # 76,800 images, 1.9 passes over train[:40000].
  c.total_steps = 1200
  c.batch_size = 64

  c.eval_every = 300
  c.checkpoint_every = 300
  c.sample_every = 1200

  # At every eval step, so probe_vs_loss.png has 4 points.
  c.evals.probe.every = 300
  c.evals.probe.layers = (2, 4, 6, 8, 10, 12)
  return c
