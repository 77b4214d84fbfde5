"""Every experiment file loads, names only fields its reader defines, and builds its model."""

import importlib
import pathlib

import pytest

from experiments import base
from experiments import probe_cifar10_tiny
from igpt_jax import model as model_lib

EXPERIMENTS_DIR = pathlib.Path(__file__).parents[1] / "experiments"
EXPERIMENTS = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py")
                     # base and imagenet_pretrain are the shared settings the others build on
                     if p.stem not in ("__init__", "base", "imagenet_pretrain"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_config(name):
  config = importlib.import_module(f"experiments.{name}").get_config()
  # A misspelt field (probe_everyy) would otherwise be an extra key the loop never reads.
  reference = (probe_cifar10_tiny if name.startswith("probe_") else base).get_config()
  assert set(config.keys()) == set(reference.keys())
  if config.model:  # probe configs may leave the model to the checkpoint
    model_lib.model_config(config.model)
