r"""Fine-tuning on CIFAR-10 as in the paper (Adam b2 .95, constant lr ~10x below pretraining,
CIFAR augmentation, early stopping on a 10% held-out split of train, 1:1 L_GEN + L_CLF).

  python -m launch.finetune --config experiments/finetune_cifar10.py \
      --config.init_workdir=PRETRAINED_RUN --workdir W

`get_config("cifar100")` gives the CIFAR-100 variant (experiments/finetune_cifar100.py).
"""

import ml_collections

N_CLASSES = {"cifar10": 10, "cifar100": 100}


def get_config(dataset: str = "cifar10"):
  c = ml_collections.ConfigDict()
  c.init_workdir = ""  # the pretraining run (required)
  c.seed = 0
  c.data = dict(name=dataset, train_split="train[:45000]", eval_split="train[45000:]",
                augment="cifar")
  c.test_split = "test"  # "" to skip
  c.n_classes = N_CLASSES[dataset]
  c.clf_weight = 1.0  # L = L_GEN + clf_weight * L_CLF
  c.k_masks = 5  # BERT models: modal prediction over k masks at eval
  c.mesh = (-1, 1, 1)

  c.lr = 1e-4
  c.warmup_steps = 0
  c.grad_clip = 0.0
  c.batch_size = 128
  c.accum_steps = 1
  c.total_steps = 100_000
  c.eval_every = 1000
  c.patience = 5  # evaluations without a held-out gain before stopping
  return c
