r"""Linear probes on CIFAR-10 as in the paper: every layer, L-BFGS logistic regression with L2
chosen on a held-out 10% of train and refit on all of train, test top-1 on the test split.

  python -m launch.probe --config experiments/probe_cifar10.py --workdir RUN [--baselines]

Images are resized to the checkpoint's n_px. `get_config("cifar100")` / `get_config("stl10")`
give the other datasets (experiments/probe_cifar100.py, probe_stl10.py).
"""

from experiments import probe_base


def get_config(dataset: str = "cifar10"):
  c = probe_base.get_config()
  c.data = dict(name=dataset, train_split="train", eval_split="test")
  c.solver = "lbfgs"  # the paper's CIFAR / STL protocol
  c.low_data.sizes = (40, 250, 4000) if dataset == "cifar10" else ()
  return c
