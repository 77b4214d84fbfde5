r"""Fine-tuning on CIFAR-10 as in the paper: Adam b2 .95 at a constant lr ~10x below pretraining,
CIFAR augmentation, early stopping on a 10% held-out split of train, 1:1 L_GEN + L_CLF.

  python -m launch.finetune --config experiments/finetune_cifar10.py \
      --config.init_workdir=PRETRAINED_RUN --workdir W

`get_config("cifar100")` gives the CIFAR-100 variant (experiments/finetune_cifar100.py).
"""

from experiments import base

N_CLASSES = {"cifar10": 10, "cifar100": 100}


def get_config(dataset: str = "cifar10"):
  c = base.get_config()
  c.init_workdir = ""  # the pretraining run (required: --config.init_workdir=RUN)
  c.data = dict(name=dataset, train_split="train[:45000]", eval_split="train[45000:]",
                augment="cifar")
  c.test_split = "test"
  c.n_classes = N_CLASSES[dataset]
  c.k_masks = 5  # ensembling 5 masks adds ~1% for BERT models in the paper
  c.lr = 1e-4
  c.schedule = "constant"  # the paper fine-tunes without a schedule
  c.total_steps = 100_000
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.patience = 5
  return c
