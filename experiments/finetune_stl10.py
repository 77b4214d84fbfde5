"""Fine-tuning on STL-10 (96x96 -> the checkpoint's n_px): 10% of train held out for early
stopping, test on the test split."""

from experiments import finetune_cifar10


def get_config():
  c = finetune_cifar10.get_config()
  c.data.name = "stl10"
  c.data.train_split, c.data.eval_split = "train[:4500]", "train[4500:]"
  return c
