"""The palette on real CIFAR-10 pixels: nearest-centre property, round trip, k-means progress;
one palette per job."""

import numpy as np
import pytest

from igpt_jax import palette as P
from conftest import run_pair


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
