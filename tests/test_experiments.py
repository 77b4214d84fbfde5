"""Every experiment file loads, names only fields its reader defines, and builds its model."""

import dataclasses
import importlib
import pathlib

from absl import flags
from ml_collections import config_flags
import pytest

from experiments import base
from experiments import probe_base
from igpt_jax import model as model_lib

EXPERIMENTS_DIR = pathlib.Path(__file__).parents[1] / "experiments"
EXPERIMENTS = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py")
                     # base and imagenet_pretrain are the shared settings the others build on
                     if p.stem not in ("__init__", "base", "imagenet_pretrain"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_config(name):
  config = importlib.import_module(f"experiments.{name}").get_config()
  # A misspelt field (eval_everyy) would otherwise be an extra key the loop never reads.
  reference = (probe_base if name.startswith("probe_") else base).get_config()
  assert set(config.keys()) == set(reference.keys())
  kinds = {e.type: e for e in reference.get("evals", {}).values()}
  for key, entry in config.get("evals", {}).items():  # evaluators: their kind's fields
    assert set(entry.keys()) == set(kinds[entry.type].keys()), key
  # Every model field is there to be set from the command line (unset ones are None).
  fields = {f.name for f in dataclasses.fields(model_lib.IGPTConfig)}
  assert set(config.model.keys()) == fields | {"preset"}
  model_lib.model_config(config.model)


@pytest.mark.parametrize("name", ["cifar10_tiny", "igpt_xl", "probe_cifar10_tiny"])
def test_model_fields_are_set_from_the_command_line(name):
  argv = ["prog", f"--config={EXPERIMENTS_DIR / name}.py", "--config.model.dtype=bfloat16",
          "--config.model.remat=full", "--config.model.n_layer=5", "--config.model.norm_eps=1e-6"]
  values = flags.FlagValues()  # the flag launch/*.py define, parsing a command line
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  set_fields = model_lib.set_fields(values.config.model)
  assert {k: set_fields[k] for k in ("dtype", "remat", "n_layer", "norm_eps")} == dict(
      dtype="bfloat16", remat="full", n_layer=5, norm_eps=1e-6)
  if name != "probe_cifar10_tiny":  # probes take the rest from the checkpoint
    cfg = model_lib.model_config(values.config.model)
    assert (cfg.dtype, cfg.remat, cfg.n_layer) == ("bfloat16", "full", 5)
