r"""Trains iGPT: `python -m launch.train --config experiments/cifar10_tiny.py --workdir W`.

W may be local or in a bucket (`--workdir gs://bucket/run`): everything the run writes goes there.

Pretrains, or fine-tunes when the config names `init_workdir` (see launch/finetune.py); resumes
from the newest readable checkpoint in the workdir. Override config fields on the command line,
e.g. `--config.total_steps=100`. When the config names no palette file and the workdir has none,
one is fitted from the training split first and saved as workdir/palette.npy. On a CPU host, a
config mesh that fills the devices (a -1) spans every core: each core is one XLA device
(`sharding.use_one_cpu_device_per_core`) and the batch is split over them.
"""

# pylint: disable=wrong-import-position
from igpt_jax import console

console.setup()  # first, before anything imports jax: see console.setup

from absl import app
from absl import flags
from ml_collections import config_flags

from igpt_jax import faults
from igpt_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here: a "
                                "local directory or a bucket (gs://bucket/run).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  train.run(_CONFIG.value, _WORKDIR.value)
  faults.exit_done()


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
