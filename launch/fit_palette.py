r"""Fits the k-colour palette (k-means on RGB in [-1, 1]) to pixels of a training split.

  python -m launch.fit_palette --config experiments/cifar10_tiny.py --out /tmp/palette.npy
  python -m launch.fit_palette --data ../shared/data/cifar10/train.npz --split 'train[:45000]' \
      --n_px 32 --out palette.npy

With --config, the data, split and resolution come from `config.data` and `config.model.n_px`;
--data names a dataset (tfds name or local path) directly. The recipe is
`igpt_jax.fit_palette.fit_split_palette`, the one launch/train.py uses: pixels of the first --images images of
the split at the model's resolution, as the tokenizer will see them (here a random --n_pixels of
them; launch/train.py fits all).
"""

# pylint: disable=wrong-import-position
from igpt_jax import console

console.setup()  # first, before anything imports jax: see console.setup

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from igpt_jax import data
from igpt_jax import fit_palette
from igpt_jax import palette as palette_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (uses .data, .model).")
_DATA = flags.DEFINE_string("data", None, "Dataset name or local path, instead of --config.")
_SPLIT = flags.DEFINE_string("split", None, "Split to read (default: config.data.train_split, "
                             "else 'train').")
_N_PX = flags.DEFINE_integer("n_px", None, "Resize images to n_px first (default: "
                             "config.model.n_px; none keeps the stored size).")
_OUT = flags.DEFINE_string("out", None, "Where to save the (k, 3) palette (.npy), local or gs://.")
_K = flags.DEFINE_integer("k", 512, "Number of colours (the model's vocab_size).")
_IMAGES = flags.DEFINE_integer("images", 5000, "Images to read from the start of the split.")
_N_PIXELS = flags.DEFINE_integer("n_pixels", 1_000_000, "Pixels sampled from them for k-means.")
_STEPS = flags.DEFINE_integer("steps", 300, "Mini-batch k-means steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the pixel sample and of k-means.")


def main(argv):
  del argv
  config = _CONFIG.value
  if (config is None) == (_DATA.value is None):
    raise app.UsageError("pass exactly one of --config and --data")
  data_cfg = config.data if config is not None else {"name": _DATA.value}
  split = _SPLIT.value or dict(data_cfg).get("train_split", "train")
  n_px = _N_PX.value or (config.model.get("n_px") if config is not None else None)
  with console.status(f"fitting {_K.value} colours to up to {_N_PIXELS.value} pixels of the first "
                      f"{_IMAGES.value} images ({dict(data_cfg)['name']} {split}, n_px {n_px})"):
    palette = fit_palette.fit_split_palette(data_cfg, split, n_px=n_px, k=_K.value,
                                     images=_IMAGES.value, n_pixels=_N_PIXELS.value,
                                     steps=_STEPS.value, seed=_SEED.value)
  pixels = data.load_images(data_cfg, split, _IMAGES.value, n_px=n_px)[0]
  logging.info("mean squared error %.5f (in [-1, 1] units)",
               palette_lib.distortion(pixels, palette))
  palette_lib.save_palette(_OUT.value, palette)
  logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["out"])
  app.run(main)
