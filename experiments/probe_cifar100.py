"""Linear probes on CIFAR-100: experiments/probe_cifar10.py on the other dataset."""

from experiments import probe_cifar10


def get_config():
  return probe_cifar10.get_config("cifar100")
