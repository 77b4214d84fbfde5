r"""Fine-tunes a pretrained run as a classifier (L_GEN + L_CLF, early stopping on held-out).

  python -m launch.finetune --config experiments/finetune_cifar10.py \
      --config.init_workdir=PRETRAINED_RUN --workdir W

Writes the best model (with its classifier) as W's checkpoint, W/finetune_metrics.jsonl and
W/finetune_results.json (held-out and, if config.test_split, test accuracy).
"""

import json
import os
import sys

# `python launch/finetune.py` puts launch/ first on the path; configs import their siblings as
# `experiments.*` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from igpt_jax import checkpoint
from igpt_jax import finetune
from igpt_jax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for the fine-tuned model.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  checkpoint.quiet_orbax_logs(logging.get_absl_handler())
  sharding.maybe_initialize_distributed()
  print(json.dumps(finetune.finetune(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
