r"""Fine-tunes a pretrained run as a classifier: launch/train.py with a fine-tuning config.

  python -m launch.finetune --config experiments/finetune_cifar10.py \
      --config.init_workdir=PRETRAINED_RUN --workdir W

The training loop (igpt_jax/train.py) starts from init_workdir's parameters, trains L_GEN + L_CLF,
evaluates held-out accuracy on the eval schedule, keeps the best checkpoint on disk, resumes
after preemption and stops early on config.patience. Then, if config.test_split is set, the
best checkpoint's accuracy on it goes with the held-out figures into W/finetune_results.json.
"""

# pylint: disable=wrong-import-position
from igpt_jax import console

console.setup()  # first, before anything imports jax: see console.setup

import json

from absl import app
from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags

from igpt_jax import checkpoint
from igpt_jax import data
from igpt_jax import evaluators
from igpt_jax import faults
from igpt_jax import paths
from igpt_jax import sharding
from igpt_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here: a "
                                "local directory or a bucket (gs://bucket/run).")


def test_accuracy(config, workdir: str) -> float:
  """Accuracy of workdir's best checkpoint on config.test_split."""
  mesh = sharding.make_mesh(config.mesh, dcn_shape=config.dcn_mesh)
  runtime = {k: config.model[k] for k in ("attention", "dtype") if config.model.get(k)}
  cfg, params, palette = checkpoint.load(workdir, "best", mesh=mesh, **runtime)
  batches = data.make_dataset(config.data, split=config.test_split, batch_size=config.batch_size,
                              palette=palette, n_px=cfg.n_px, train=False, seed=config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    return evaluators.held_out_accuracy(cfg, params, batches, mesh, config.k_masks, config.seed + 2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if not config.init_workdir:
    raise app.UsageError("--config.init_workdir must name the pretraining run to fine-tune")
  last = train.run(config, workdir)
  results = {"best_step": last["best_step"], "held_out_accuracy": last["best_eval_accuracy"]}
  if config.test_split:
    results["test_accuracy"] = test_accuracy(config, workdir)
  if jax.process_index() == 0:
    paths.write_json(paths.path(workdir) / "finetune_results.json", results, indent=2)
  print(json.dumps(results))
  faults.exit_done()


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
