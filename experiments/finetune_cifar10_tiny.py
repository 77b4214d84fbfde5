r"""CPU fine-tune of the README demo run on the local CIFAR-10 (a few minutes; a smoke run,
not a result).

  python -m launch.finetune --config experiments/finetune_cifar10_tiny.py \
      --config.init_workdir=/tmp/igpt_tiny --workdir /tmp/igpt_tiny_ft
"""

from experiments import base
from experiments import finetune_cifar10


def get_config():
  c = finetune_cifar10.get_config()
  c.data.name = base.cifar10()
  c.data.eval_split = "train[45000:46000]"  # fewer held-out images for CPU minutes
  c.test_split = "train[46000:]"  # the test split stays unseen: CIFAR's own test is not local
  c.lr = 3e-4  # a small model from a short pretraining run takes a larger step
  c.batch_size = 32
  c.total_steps = 300
  c.eval_every = 100
  c.checkpoint_every = 100
  c.patience = 2
  return c
