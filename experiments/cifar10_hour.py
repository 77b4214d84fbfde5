r"""An hour of pretraining on a 2-core CPU: 8 layers of width 256 on CIFAR-10 at 8x8.

  python launch/train.py --config experiments/cifar10_hour.py --workdir workdirs/hour
  python launch/probe.py --config experiments/probe_cifar10_tiny.py --workdir workdirs/hour \
      --baselines

Data, held-out split, reading and probe protocol are the README demo's
(experiments/cifar10_tiny.py); only the model and its schedule differ. Measured on the idle
development machine: 58 min 24 s of pretraining (in-run probes 9 - 12% of it), 14 min of probing;
held-out loss 3.7047 against the demo's 3.7737. The probe curve rises to layer 3 and stays flat to
the top (README, "An hour on the CPU"): at this compute it has no clear mid-depth peak.
"""

from experiments import cifar10_tiny


def get_config():
  c = cifar10_tiny.get_config()
  # 6.6M parameters, 5x the demo's: about 0.58 steps/s of batch 64 on the 2 cores.
  c.model = dict(n_px=8, n_layer=8, n_embd=256, n_head=8, attention="auto")
  # 1800 steps of 64 images fill the hour: 115,200 images, about 2.9 passes over train[:40000].
  c.total_steps = 1800
  c.batch_size = 64
  c.lr = 2e-3  # below the demo's 3e-3 for the wider, deeper model
  c.warmup_steps = 100

  c.log_every = 50
  c.eval_every = 225
  c.checkpoint_every = 450
  c.sample_every = 1800

  # Every other eval step, so probe_vs_loss.png has 4 points; about 80 s each.
  c.probe_every = 450
  c.probe_layers = (2, 4, 6, 8)
  return c
