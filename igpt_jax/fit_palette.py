"""The palette of a run: the one recipe behind launch/train.py and launch/fit_palette.py.

  fit_split_palette(data_cfg, split, n_px=, k=) -> float32 [k, 3]   k-means of a split's pixels
  run_palette(config, workdir, k, n_px) -> float32 [k, 3]           what every process of a run
                                                                     tokenizes with

A run whose config names no palette file fits one into workdir/palette.npy: process 0 alone
fits and writes it while the others wait, and then every process reads that one file, so all
hosts tokenize alike (a fit on each host could differ: reductions on a GPU are not
deterministic) and a resume reads what the run started with.
"""

from __future__ import annotations

import numpy as np

from igpt_jax import console
from igpt_jax import data as data_lib
from igpt_jax import hosts
from igpt_jax import palette as palette_lib
from igpt_jax import paths

PALETTE_IMAGES = 5000  # training images whose pixels fit a run's palette


def fit_split_palette(data_cfg, split: str, *, n_px: int | None, k: int,
                      images: int = PALETTE_IMAGES, n_pixels: int = 0, steps: int = 300,
                      seed: int = 0) -> np.ndarray:
  """k-means palette of the first `images` images of split, at n_px as the tokenizer sees them.

  n_pixels > 0 fits a random sample of that many of their pixels (seeded) instead of all.
  """
  pixels = data_lib.load_images(data_cfg, split, images, n_px=n_px)[0].reshape(-1, 3)
  if 0 < n_pixels < len(pixels):
    pixels = pixels[np.random.default_rng(seed).choice(len(pixels), n_pixels, replace=False)]
  return palette_lib.fit_palette(pixels, k, steps=steps, seed=seed)


def run_palette(config, workdir: str, k: int, n_px: int) -> np.ndarray:
  """config.palette if set, else workdir/palette.npy, fitted there from the training split
  (`fit_split_palette` defaults, config.seed) by process 0 when it is missing; every process of
  the job calls this and returns the same palette, bit for bit (checked against process 0's)."""
  if config.palette:
    if not paths.path(config.palette).exists():
      raise FileNotFoundError(f"palette file {config.palette} not found (launch/fit_palette.py "
                              "fits one; an empty config.palette fits one into the workdir)")
    return palette_lib.load_palette(config.palette, k=k)
  path = paths.path(workdir) / "palette.npy"

  def fitted_once() -> str:  # process 0
    if not path.exists():
      with console.status(f"fitting a {k}-colour palette to {config.data['name']} "
                          f"{config.data['train_split']}"):
        palette_lib.save_palette(path, fit_split_palette(
            config.data, config.data["train_split"], n_px=n_px, k=k, seed=config.seed))
    return palette_lib.digest(palette_lib.load_palette(path, k=k))

  digest = hosts.from_process_0(f"palette {path}", fitted_once)
  if not path.exists():
    raise FileNotFoundError(f"{path}, written by process 0, is not there for this process: the "
                            "workdir must be one place every host reaches (docs/pods.md)")
  palette = palette_lib.load_palette(path, k=k)
  if palette_lib.digest(palette) != digest:
    raise ValueError(f"{path} reads differently here than on process 0")
  return palette
