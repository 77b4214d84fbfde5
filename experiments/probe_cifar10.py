r"""Linear probes on CIFAR-10 as in the paper: every layer, L-BFGS logistic regression with L2
chosen on a held-out 10% of train and refit on all of train, test top-1 on the test split.

  python -m launch.probe --config experiments/probe_cifar10.py --workdir RUN [--baselines]

Images are resized to the checkpoint's n_px. `get_config("cifar100")` / `get_config("stl10")`
give the other datasets (experiments/probe_cifar100.py, probe_stl10.py).
"""

import ml_collections

from experiments import base


def get_config(dataset: str = "cifar10"):
  c = ml_collections.ConfigDict()
  # The probe makes its own 10% held-out split of train_split to choose the L2 penalty.
  c.data = dict(name=dataset, train_split="train", eval_split="test")
  # Unset: the checkpoint's. `attention` / `dtype` override how it runs here (checkpoint.load);
  # architecture fields set must match the checkpoint.
  c.model = base.model_fields()
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor) over this host's devices; (1, -1, 1) splits the
  # parameters over them (iGPT-L / XL on 16 GB chips)
  c.layers = ()  # empty: all, 0..n_layer
  c.reading = "ln1"  # or "residual" (the pre-norm block input)
  c.batch_size = 512
  c.l2s = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
  c.val_fraction = 0.1
  c.concat_k = 5  # iGPT-XL's best result concatenates 5 layers around the best
  # Low-data probes on the best layer (per-class balanced subsets, 5 seeds, mean +- std).
  c.low_data = dict(sizes=(40, 250, 4000) if dataset == "cifar10" else (), seeds=5,
                    balanced=True)
  c.random_init_seed = 0
  return c
