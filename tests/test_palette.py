"""The palette on real CIFAR-10 pixels: nearest-centre property, round trip, k-means progress;
one palette per job."""

import jax.numpy as jnp
import numpy as np
import pytest

from igpt_jax import palette as P
from conftest import run_pair, tie_palette


@pytest.fixture(scope="module")
def fitted(cifar10_sample):
  images, _ = cifar10_sample
  return P.fit_palette(images[:256], k=64, steps=60, batch_size=4096, seed=0)


def brute_force_nearest(images, palette):
  x = images.reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
  d = ((x[:, None, :] - palette[None].astype(np.float64)) ** 2).sum(-1)
  return d, d.argmin(-1)


def test_quantize_picks_the_nearest_centre(cifar10_sample, fitted):
  images = cifar10_sample[0][300:304]
  tokens = np.asarray(P.quantize(images, fitted))
  assert tokens.shape == (4, 1024) and tokens.dtype == np.int32
  d, nearest = brute_force_nearest(images, fitted)
  chosen = d[np.arange(len(d)), tokens.reshape(-1)]
  # Equal to the brute-force argmin except on float ties, where the distance must still be minimal.
  np.testing.assert_allclose(chosen, d.min(-1), atol=1e-6)
  assert np.mean(tokens.reshape(-1) == nearest) > 0.999


def test_round_trip_on_real_images(cifar10_sample, fitted):
  images = cifar10_sample[0][300:310]
  restored = P.dequantize(P.quantize(images, fitted), fitted, 32)
  assert restored.shape == images.shape and restored.dtype == np.uint8
  # Quantizing the decoded image again is the identity: decoded colours are (rounded) centres.
  again = P.dequantize(P.quantize(restored, fitted), fitted, 32)
  np.testing.assert_array_equal(again, restored)
  # 64 colours keep real photos recognisable: mean error a few grey levels, far below the spread.
  err = np.abs(restored.astype(int) - images.astype(int)).mean()
  assert err < 10 < images.std()


def test_kmeans_distortion_decreases(cifar10_sample):
  images = cifar10_sample[0][:256]
  held_out = cifar10_sample[0][400:450]
  distortions = [P.distortion(held_out, P.fit_palette(images, k=64, steps=s, batch_size=4096))
                 for s in (1, 10, 60)]
  assert distortions[0] > distortions[1] > distortions[2]


def test_fit_is_seeded(cifar10_sample):
  images = cifar10_sample[0][:64]
  a = P.fit_palette(images, k=16, steps=5, batch_size=1024, seed=3)
  np.testing.assert_array_equal(a, P.fit_palette(images, k=16, steps=5, batch_size=1024, seed=3))
  assert not np.array_equal(a, P.fit_palette(images, k=16, steps=5, batch_size=1024, seed=4))


def test_save_load_round_trip(tmp_path, fitted):
  path = tmp_path / "palette.npy"
  P.save_palette(path, fitted)
  np.testing.assert_array_equal(P.load_palette(path, k=64), fitted)
  with pytest.raises(ValueError, match="expected 512"):
    P.load_palette(path, k=512)
  with pytest.raises(ValueError, match="does not exist"):
    P.load_palette(tmp_path / "missing.npy")


def test_bad_input_is_refused_clearly():
  palette = np.zeros((8, 3), np.float32)
  with pytest.raises(ValueError, match="uint8"):
    P.quantize(np.zeros((2, 4, 4, 3), np.float32), palette)
  with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 3\]"):
    P.quantize(np.zeros((2, 4, 4), np.uint8), palette)
  with pytest.raises(ValueError, match=r"shape \(k, 3\)"):
    P.quantize(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((8, 4), np.float32))
  with pytest.raises(ValueError, match="lie in"):
    P.dequantize(np.full((1, 16), 8), palette, 4)
  with pytest.raises(ValueError, match="n_px=5"):
    P.dequantize(np.zeros((1, 16), int), palette, 5)


@pytest.mark.slow
def test_a_job_fits_one_palette_on_process_0_and_every_process_reads_it(cifar10_sample,
                                                                         tmp_path):
  np.savez(tmp_path / "images.npz", images=cifar10_sample[0][:64], labels=cifar10_sample[1][:64])
  outs = run_pair("palette", tmp_path / "run", f"--data={tmp_path / 'images.npz'}")
  assert [o["fitted"] for o in outs] == [True, False]  # process 1 waited for process 0's
  saved = P.load_palette(tmp_path / "run" / "palette.npy")
  for o in outs:  # bit for bit the file's
    np.testing.assert_array_equal(np.asarray(o["palette"], np.float32), saved)


def distance_table_tokens(pixels, palette):
  """Tokens as the pipeline computed them before the lookup table, restated: float32 squared
  distances per channel from levels scaled as XLA CPU scales x / 127.5 - 1, summed red + green,
  then + blue; the first least centre. pixels uint8 [N, 3] -> (int [N], ties: bool [N])."""
  levels = np.asarray(jnp.asarray(np.arange(256), jnp.float32) / 127.5 - 1.0)
  d = [(levels[:, None] - palette[:, c]) ** 2 for c in range(3)]
  tokens, ties = [], []
  for p in np.array_split(pixels, -(-len(pixels) // 2 ** 16)):
    sums = (d[0][p[:, 0]] + d[1][p[:, 1]]) + d[2][p[:, 2]]  # [n, k] float32
    tokens.append(np.argmin(sums, -1))
    ties.append((sums == sums.min(-1, keepdims=True)).sum(-1) > 1)
  return np.concatenate(tokens), np.concatenate(ties)


def test_quantize_is_the_distance_tables_nearest_centre_where_xla_fuses_an_fma():
  # For this colour and palette, centres 387 and 409 are 0.03244394 away in the distance tables'
  # float32 sums; XLA CPU fused (c - x)^2 + s into one FMA and found 409 nearer (0.032443937),
  # so quantize disagreed with the tokens the pipeline trains on.
  palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
  pixel = np.array([[[200, 89, 141]]], np.uint8)
  want, _ = distance_table_tokens(pixel.reshape(1, 3), palette)
  assert int(np.asarray(P.quantize(pixel, palette))[0]) == int(want[0]) == 387


def test_nearest_table_is_the_distance_tables_argmin_for_every_colour_ties_included():
  palette = tie_palette(np.random.default_rng(1).uniform(-1, 1, (10, 3)).astype(np.float32))
  table = P.nearest_table(palette)
  assert table.shape == (256, 256, 256) and table.dtype == np.uint16
  colours = np.stack(np.meshgrid(*[np.arange(256, dtype=np.uint8)] * 3, indexing="ij"), -1)
  want, ties = distance_table_tokens(colours.reshape(-1, 3), palette)
  assert ties.sum() > 1000  # the palette does tie, on many colours
  np.testing.assert_array_equal(table.reshape(-1), want)
