r"""CPU fine-tune of the README demo run on the local CIFAR-10 (a few minutes; a smoke run,
not a result).

  python -m launch.finetune --config experiments/finetune_cifar10_tiny.py \
      --config.init_workdir=/tmp/igpt_tiny --workdir /tmp/igpt_tiny_ft
"""

from experiments import finetune_cifar10
from experiments import probe_cifar10_tiny


def get_config():
  c = finetune_cifar10.get_config()
  c.data.name = probe_cifar10_tiny.get_config().data.name
  c.data.eval_split = "train[45000:46000]"  # held-out for early stopping; fewer for CPU minutes
  c.test_split = "train[46000:]"
  c.lr = 3e-4
  c.batch_size = 32
  c.total_steps = 300
  c.eval_every = 100
  c.patience = 2
  return c
