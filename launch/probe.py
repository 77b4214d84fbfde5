r"""Linear probes of a pretrained run at every layer, as in the paper.

  python -m launch.probe --config experiments/probe_cifar10_tiny.py --workdir W [--baselines]

Reads the latest checkpoint of W, streams the train and test splits of `config.data` (tfds names
or local .npz files) through a pmapped extraction pass into W/probe/features/*.npy, then probes
every layer, the concatenation of `concat_k` layers around the best one, and low-data subsets.
Writes W/probe/results.json and W/probe/accuracy_by_layer.png. --baselines adds, through the same
probe code, raw palette pixels (colour histogram, dequantized RGB) and a randomly initialised
model of the same shape.
"""

import json
import os
import sys

# `python launch/probe.py` puts launch/ first on the path; configs import their siblings as
# `experiments.*` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
from ml_collections import config_flags

from igpt_jax import console
from igpt_jax import probe
from igpt_jax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Probe config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding the checkpoint.")
_BASELINES = flags.DEFINE_bool("baselines", False,
                               "Also probe raw pixels and a random-init model of the same shape.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  console.setup()
  sharding.require_one_process("launch/probe.py")  # extraction spans this host's devices
  results = probe.run(_CONFIG.value, _WORKDIR.value, baselines=_BASELINES.value, step=_STEP.value)
  print(json.dumps(results["summary"]))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
