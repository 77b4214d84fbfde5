r"""Pretrains iGPT: `python -m launch.train --config experiments/cifar10_tiny.py --workdir W`.

Resumes from the latest checkpoint in the workdir. Override config fields on the command line,
e.g. `--config.total_steps=100`. When the config names no palette file and the workdir has none,
one is fitted from the training split first and saved as workdir/palette.npy. On a CPU host, a
config mesh that fills the devices (a -1) spans every core: each core is one XLA device
(`sharding.use_one_cpu_device_per_core`) and the batch is split over them.
"""

import os
import sys

# `python launch/train.py` puts launch/ first on the path; configs import their siblings as
# `experiments.*` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from igpt_jax import checkpoint
from igpt_jax import data
from igpt_jax import palette as palette_lib
from igpt_jax import sharding
from igpt_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here.")
_PALETTE_IMAGES = flags.DEFINE_integer("palette_images", 5000,
                                       "Training images whose pixels fit the palette.")


def ensure_palette(config, workdir: str) -> None:
  if config.palette:
    return  # train.load_run_palette checks that it exists
  path = os.path.join(workdir, "palette.npy")
  if os.path.exists(path):
    return
  cfg = train.model_config(config.model)
  images, _ = data.load_images(config.data, config.data.train_split, _PALETTE_IMAGES.value,
                               n_px=cfg.n_px)
  logging.info("fitting a %d-colour palette on %d images of %s", cfg.vocab_size, len(images),
               config.data.name)
  palette_lib.save_palette(path, palette_lib.fit_palette(images, k=cfg.vocab_size,
                                                         seed=config.seed))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  checkpoint.quiet_orbax_logs(logging.get_absl_handler())
  config = _CONFIG.value
  if -1 in tuple(config.mesh):  # an explicit mesh names its own device count
    sharding.use_one_cpu_device_per_core(config.batch_size // config.accum_steps)
  sharding.maybe_initialize_distributed()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  ensure_palette(config, _WORKDIR.value)
  train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
