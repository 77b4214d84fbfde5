"""Linear probes on STL-10: its 96x96 images are area-resized to the checkpoint's n_px (32 in
the paper). Only the labelled `train` and `test` splits are used (`unlabelled` has no labels)."""

from experiments import probe_cifar10


def get_config():
  return probe_cifar10.get_config("stl10")
