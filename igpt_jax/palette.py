"""The 9-bit colour palette: k-means centres of RGB pixels scaled to [-1, 1].

An image becomes a token sequence by replacing each pixel with the index of its nearest centre
(raster order), and a token sequence becomes an image by looking the centres up again. The
released palette (OpenAI's `kmeans_centers.npy`, Hugging Face's `clusters`) is a (512, 3) float
array in [-1, 1] and loads here as is.

"Nearest" has one definition, `distance_tables`: float32 squared distances per channel, summed
red + green, then + blue, the first centre winning a tie. `nearest_table` evaluates it once for
each of the 2^24 colours (a uint16 lookup table, 32 MiB, built in about 2 s on one core), and
both `quantize` and the tf.data pipeline (igpt_jax/data.py) look tokens up there, so they agree
bit for bit on every host and backend.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import paths


def to_unit(pixels_uint8) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], the scale the centres live in.

  x times float32(1 / 127.5), minus 1: what XLA CPU compiled `x / 127.5 - 1` to (a division by
  a constant becomes a product with its reciprocal), so tokens are those of earlier runs; in
  numpy, so that no backend rounds it another way.
  """
  return np.asarray(pixels_uint8, np.float32) * np.float32(1 / 127.5) - np.float32(1)


def check_palette(palette, k: int | None = None) -> np.ndarray:
  """The palette as float32 [k, 3], or a ValueError saying what is wrong with it."""
  palette = np.asarray(palette)
  if palette.ndim != 2 or palette.shape[1] != 3:
    raise ValueError(f"palette must have shape (k, 3), got {palette.shape}")
  if k is not None and palette.shape[0] != k:
    raise ValueError(f"palette has {palette.shape[0]} colours, expected {k}")
  if not np.issubdtype(palette.dtype, np.floating):
    raise ValueError(f"palette must be float centres in [-1, 1], got dtype {palette.dtype}")
  if not np.all(np.isfinite(palette)) or np.abs(palette).max() > 1.0 + 1e-6:
    raise ValueError("palette centres must be finite and lie in [-1, 1]")
  return palette.astype(np.float32)


def _check_images(images) -> None:
  shape, dtype = np.shape(images), getattr(images, "dtype", None)
  if dtype != np.uint8:
    raise ValueError(f"images must be uint8 [..., H, W, 3], got dtype {dtype}")
  if len(shape) < 3 or shape[-1] != 3:
    raise ValueError(f"images must be uint8 [..., H, W, 3], got shape {shape}")


@jax.jit
def _nearest(points, palette):  # [N, 3], [k, 3] -> int32 [N]
  """Nearest centres of float points, for fitting (the centres move). Not the tokens' definition:
  XLA fuses a square and the following add into one FMA, which rounds once where
  `distance_tables` rounds twice, and so differs on rare near-ties."""
  scores = sum((points[:, i:i + 1] - palette[None, :, i]) ** 2 for i in range(3))
  return jnp.argmin(scores, axis=-1).astype(jnp.int32)


def distance_tables(palette) -> np.ndarray:
  """float32 [3, 256, k]: squared distance from each level of each channel to each centre's.

  A pixel's distance to centre j is (d[0, r, j] + d[1, g, j]) + d[2, b, j], in float32, and its
  token the first j of the least: the definition of "nearest" (numpy, op by op: no fused FMA).
  """
  palette = check_palette(palette)
  levels = to_unit(np.arange(256, dtype=np.uint8))
  return np.stack([np.square(levels[:, None] - palette[:, i]) for i in range(3)])


TABLE_CELL = 4  # `nearest_table` bounds blocks of 4x4x4 colours


def _build_table(d: np.ndarray) -> np.ndarray:
  """`distance_tables` d [3, 256, k] -> uint16 [256, 256, 256]: every colour's nearest centre.

  Exhaustive search is 2^24 x k sums (36 s on one core at k = 512). Here, for each block of
  4x4x4 colours, the sums of the per-channel minima (maxima) over the block bound every
  colour's distance to centre j from below (above): float addition is monotone, so they bound
  the exact float32 sums too. Only centres whose lower bound is at most the least upper bound
  can be nearest anywhere in the block (ties included), about 2 of 512; the exact sums are
  taken over those alone, and the least index among the minima wins, as in an argmin.
  """
  k, n, cell = d.shape[-1], 256 // TABLE_CELL, TABLE_CELL
  blocks = d.reshape(3, n, cell, k)
  lo, hi = blocks.min(2), blocks.max(2)  # [3, n, k]
  out = np.empty((n, cell, 256, 256), np.uint16)
  for i in range(n):  # one block of red levels at a time: [n, n, k] bounds
    lower = (lo[0, i] + lo[1][:, None]) + lo[2][None, :]
    upper = (hi[0, i] + hi[1][:, None]) + hi[2][None, :]
    keep = (lower <= upper.min(-1, keepdims=True)).reshape(n * n, k)
    block, centre = np.nonzero(keep)  # block-major, centres ascending within a block
    g, b = block // n, block % n
    red = blocks[0][i][:, centre].T  # [P, 4]: P (block, centre) pairs, the block's 4 levels
    green, blue = blocks[1][g, :, centre], blocks[2][b, :, centre]  # [P, 4]
    sums = ((red[:, :, None, None] + green[:, None, :, None])
            + blue[:, None, None, :]).reshape(len(centre), -1)  # [P, 64]: the block's colours
    starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
    least = np.repeat(np.minimum.reduceat(sums, starts), np.diff(np.r_[starts, len(block)]), 0)
    ids = np.minimum.reduceat(np.where(sums == least, centre[:, None], k), starts)  # [n*n, 64]
    out[i] = (ids.reshape(n, n, cell, cell, cell).transpose(2, 0, 3, 1, 4)
              .reshape(cell, 256, 256))
  return out.reshape(256, 256, 256)


@functools.lru_cache(maxsize=2)
def _cached_table(palette_bytes: bytes, k: int) -> np.ndarray:
  table = _build_table(distance_tables(np.frombuffer(palette_bytes, np.float32).reshape(k, 3)))
  table.flags.writeable = False
  return table


def nearest_table(palette) -> np.ndarray:
  """uint16 [256, 256, 256]: the token of every RGB colour (`distance_tables`' nearest centre).

  A pure function of the palette, so every host builds the same table (about 2 s of one core
  and 32 MiB; kept for the last two palettes of the process).
  """
  palette = check_palette(palette)
  if len(palette) > 2 ** 16:
    raise ValueError(f"a palette of {len(palette)} colours does not fit uint16 token ids")
  return _cached_table(palette.tobytes(), len(palette))


def quantize(images_uint8, palette) -> jax.Array:
  """uint8 images [..., H, W, 3] -> int32 tokens [..., H*W] (raster order, nearest centre)."""
  _check_images(images_uint8)
  table = nearest_table(palette)
  images = np.asarray(images_uint8)
  tokens = table[images[..., 0], images[..., 1], images[..., 2]].astype(np.int32)
  return jnp.asarray(tokens.reshape(*images.shape[:-3], -1))


def dequantize(tokens, palette, n_px: int) -> np.ndarray:
  """int tokens [..., n_px*n_px] -> uint8 images [..., n_px, n_px, 3]."""
  palette = check_palette(palette)
  tokens = np.asarray(tokens)
  if tokens.shape[-1:] != (n_px * n_px,):
    raise ValueError(f"tokens of shape {tokens.shape} are not [..., {n_px * n_px}] (n_px={n_px})")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= len(palette)):
    raise ValueError(f"token ids must lie in [0, {len(palette)}), got range "
                     f"[{tokens.min()}, {tokens.max()}]")
  rgb = np.rint(127.5 * (palette[tokens] + 1.0)).clip(0, 255).astype(np.uint8)
  return rgb.reshape(*tokens.shape[:-1], n_px, n_px, 3)


def distortion(pixels_uint8, palette) -> float:
  """Mean squared distance (in [-1, 1] units) from each pixel to its nearest centre."""
  points = to_unit(np.asarray(pixels_uint8).reshape(-1, 3))
  palette = jnp.asarray(check_palette(palette))
  nearest = palette[_nearest(points, palette)]
  return float(jnp.mean(jnp.sum((points - nearest) ** 2, axis=-1)))


@functools.partial(jax.jit, static_argnames=("k", "steps", "batch_size"))
def _minibatch_kmeans(points, rng, *, k, steps, batch_size):
  """Sculley's mini-batch k-means: each centre moves toward its batch mean at rate 1/count."""
  init_rng, run_rng = jax.random.split(rng)
  centres = points[jax.random.choice(init_rng, len(points), (k,), replace=False)]

  def step(state, rng):
    centres, counts = state
    batch_rng, reseed_rng = jax.random.split(rng)
    batch = points[jax.random.randint(batch_rng, (batch_size,), 0, len(points))]
    assign = _nearest(batch, centres)
    n = jax.ops.segment_sum(jnp.ones(batch_size), assign, num_segments=k)
    sums = jax.ops.segment_sum(batch, assign, num_segments=k)
    counts = counts + n
    centres = centres + (sums - n[:, None] * centres) / jnp.maximum(counts, 1.0)[:, None]
    # A centre that has never won a pixel is wasted: move it onto a random pixel of this batch.
    dead = counts == 0
    fresh = batch[jax.random.randint(reseed_rng, (k,), 0, batch_size)]
    return (jnp.where(dead[:, None], fresh, centres), counts), None

  (centres, _), _ = jax.lax.scan(step, (centres, jnp.zeros(k)), jax.random.split(run_rng, steps))
  return jnp.clip(centres, -1.0, 1.0)


def fit_palette(pixels_uint8, k: int = 512, *, steps: int = 300, batch_size: int = 16384,
                seed: int = 0) -> np.ndarray:
  """Fits k colour centres (float32 [k, 3] in [-1, 1]) to uint8 pixels [..., 3]."""
  pixels = np.asarray(pixels_uint8)
  if pixels.dtype != np.uint8 or pixels.shape[-1:] != (3,):
    raise ValueError(f"pixels must be uint8 [..., 3], got {pixels.dtype} {pixels.shape}")
  points = to_unit(pixels.reshape(-1, 3))
  if len(points) < k:
    raise ValueError(f"need at least k={k} pixels to fit a palette, got {len(points)}")
  centres = _minibatch_kmeans(points, jax.random.key(seed), k=k, steps=steps,
                              batch_size=batch_size)
  return np.asarray(centres, np.float32)


def save_palette(path: paths.PathLike, palette) -> None:
  """Writes the centres as an .npy file (local or gs://)."""
  paths.save_npy(path, check_palette(palette))


def load_palette(path: paths.PathLike, k: int | None = None) -> np.ndarray:
  """Loads a (k, 3) centre file such as OpenAI's released `kmeans_centers.npy` (local or gs://)."""
  if not paths.path(path).exists():
    raise ValueError(f"palette file {path} does not exist (fit one with launch/fit_palette.py)")
  return check_palette(paths.load_npy(path), k)


def digest(palette) -> str:
  """A short fingerprint of a palette's float32 values: equal for the same palette, bit for bit."""
  return hashlib.sha256(check_palette(palette).tobytes()).hexdigest()[:16]
