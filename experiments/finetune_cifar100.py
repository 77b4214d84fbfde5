"""Fine-tuning on CIFAR-100: experiments/finetune_cifar10.py with 100 classes."""

from experiments import finetune_cifar10


def get_config():
  return finetune_cifar10.get_config("cifar100")
