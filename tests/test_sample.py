"""Sampler: KV-cache decoding against the full forward, filtering, prompts, seeds, sharding, grids,
and the launch script on converted Hugging Face weights."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from igpt_jax import palette as palette_lib
from igpt_jax import sample as sample_lib
from igpt_jax import sharding
from igpt_jax.model import IGPT, IGPTConfig, init_params
from conftest import grid_cells, write_random_hf_imagegpt

CFG = IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=4, vocab_size=16)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def params():
  p = init_params(CFG, jax.random.key(0))
  # The output table starts at zero (uniform logits); a random one makes greedy paths varied.
  p["wtet"] = jax.random.normal(jax.random.key(1), p["wtet"].shape)
  return p


@pytest.fixture(scope="module")
def prompt():
  return jax.random.randint(jax.random.key(2), (4, 3), 0, CFG.vocab_size)


def greedy_by_full_forward(params, prompt):
  """Reference: rerun the whole uncached model for every new token."""
  tokens = np.zeros((prompt.shape[0], CFG.n_ctx), np.int32)
  tokens[:, :prompt.shape[1]] = prompt
  forward = jax.jit(lambda t: IGPT(CFG).apply({"params": params}, t))
  for i in range(prompt.shape[1], CFG.n_ctx):
    tokens[:, i] = np.argmax(forward(tokens)[:, i], axis=-1)
  return tokens


def test_greedy_cached_sampling_equals_full_forward(params, prompt):
  for p in (prompt, prompt[:, :0]):
    got = sample_lib.sample(CFG, params, jax.random.key(0), prompt=p, temperature=0)
    want = greedy_by_full_forward(params, np.asarray(p))
    np.testing.assert_array_equal(got, want)
  assert len(np.unique(want)) > 2  # the check above is not about a constant sequence


def test_top_k_1_and_tiny_top_p_are_greedy(params, prompt):
  greedy = sample_lib.sample(CFG, params, jax.random.key(0), prompt=prompt, temperature=0)
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    got = sample_lib.sample(CFG, params, jax.random.key(3), prompt=prompt, temperature=1.0, **kw)
    np.testing.assert_array_equal(got, greedy)


def test_filter_logits_keeps_top_k_and_nucleus():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  keep = lambda **kw: np.isfinite(sample_lib._filter_logits(logits, **kw))[0].tolist()
  assert keep(top_k=2, top_p=None) == [False, True, False, True]
  # Smallest set reaching the mass: 0.5 alone for 0.5; 0.5 + 0.3 for 0.6; three for 0.81.
  assert keep(top_k=None, top_p=0.5) == [False, True, False, False]
  assert keep(top_k=None, top_p=0.6) == [False, True, False, True]
  assert keep(top_k=None, top_p=0.81) == [False, True, True, True]


def test_seed_determines_samples(params):
  draw = lambda seed: np.asarray(sample_lib.sample(CFG, params, jax.random.key(seed),
                                                   batch_size=4))
  a, b, c = draw(0), draw(0), draw(1)
  np.testing.assert_array_equal(a, b)
  assert (a != c).mean() > 0.3
  assert a.shape == (4, CFG.n_ctx) and a.dtype == np.int32
  assert a.min() >= 0 and a.max() < CFG.vocab_size


def test_completions_keep_the_prompt(params):
  tokens = jax.random.randint(jax.random.key(4), (2, CFG.n_ctx), 0, CFG.vocab_size)
  for prefix_len in (0, 5, 8, CFG.n_ctx):
    out = np.asarray(sample_lib.complete(CFG, params, jax.random.key(5), tokens, prefix_len,
                                         samples=3))
    assert out.shape == (2, 3, CFG.n_ctx)
    np.testing.assert_array_equal(out[:, :, :prefix_len],
                                  np.repeat(np.asarray(tokens)[:, None, :prefix_len], 3, 1))
    if prefix_len < CFG.n_ctx:  # the three completions of an image differ
      assert (out[:, 0, prefix_len:] != out[:, 1, prefix_len:]).any()
  assert sample_lib.prefix_length(CFG, rows=2) == 8 == sample_lib.prefix_length(CFG, fraction=.5)


def test_a_cpu_host_splits_the_model_over_its_cores_then_the_batch():
  # conftest fakes 8 CPU devices: CFG's 4 heads split over 4 of them, the images over the rest.
  shape = lambda batch, cfg=CFG: dict(sample_lib.host_mesh(cfg, batch).shape)
  assert shape(4) == {"data": 2, "fsdp": 1, "tensor": 4}
  assert shape(1) == shape(3) == {"data": 1, "fsdp": 1, "tensor": 4}
  assert shape(8, CFG.replace(n_head=8, n_embd=64)) == {"data": 1, "fsdp": 1, "tensor": 8}
  assert sample_lib.host_mesh(CFG.replace(n_head=1), 1) is None


@pytest.mark.slow
def test_sampling_with_the_model_split_over_cpu_cores_draws_the_same_tokens(params, prompt):
  mesh = sample_lib.host_mesh(CFG, len(prompt))
  want = sample_lib.sample(CFG, params, jax.random.key(6), prompt=prompt)
  got = sample_lib.sample(CFG, params, jax.random.key(6), prompt=prompt, mesh=mesh)
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_sharded_sampling_equals_unsharded(params, prompt):
  assert jax.device_count() == 8, "conftest fakes 8 CPU devices"
  mesh = sharding.make_mesh((4, 2, 1))
  prompt8 = jnp.concatenate([prompt, prompt[::-1]])
  for kw in (dict(), dict(top_k=5, top_p=0.9), dict(temperature=0)):
    want = sample_lib.sample(CFG, params, jax.random.key(6), prompt=prompt8, **kw)
    got = sample_lib.sample(CFG, params, jax.random.key(6), prompt=prompt8, mesh=mesh, **kw)
    assert got.sharding.spec == sharding.batch_sharding(mesh).spec
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="batch shards"):
    sample_lib.sample(CFG, params, jax.random.key(0), batch_size=3, mesh=mesh)


@pytest.mark.parametrize("shards", [3, 6, 7])
def test_sample_grid_on_meshes_the_batch_splits_unevenly(params, shards, tmp_path):
  mesh = sharding.make_mesh((shards, 1, 1), jax.devices()[:shards])
  palette = np.random.default_rng(0).uniform(-1, 1, (CFG.vocab_size, 3)).astype(np.float32)
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (4, CFG.n_ctx), 0, CFG.vocab_size))
  grid = sample_lib.save_samples(tmp_path / "g.png", CFG, params, palette, jax.random.key(4),
                                 tokens, mesh)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), grid)
  # Upscaled as launch/sample.py's grids: each image about 128 pixels wide.
  assert grid.shape[1] >= 8 * 128
  rows = grid_cells(grid, CFG.n_px, scale=sample_lib.display_scale(CFG.n_px))
  assert len(rows) == 5 and len(rows[0]) >= 8  # unconditional samples, then one row per image
  originals = palette_lib.dequantize(tokens, palette, CFG.n_px)
  for row, original in zip(rows[1:], originals):  # [input | completions | original]
    np.testing.assert_array_equal(row[-1], original)
    for image in row[1:-1]:  # the top half is the prompt's
      np.testing.assert_array_equal(image[:CFG.n_px // 2], original[:CFG.n_px // 2])


def test_bad_arguments_raise(params):
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="batch_size or a prompt"):
    sample_lib.sample(CFG, params, key)
  with pytest.raises(ValueError, match="token ids"):
    sample_lib.sample(CFG, params, key, prompt=np.full((2, 3), CFG.vocab_size))
  with pytest.raises(ValueError, match="temperature"):
    sample_lib.sample(CFG, params, key, batch_size=2, temperature=-1)
  with pytest.raises(ValueError, match="top_k"):
    sample_lib.sample(CFG, params, key, batch_size=2, top_k=0)
  with pytest.raises(ValueError, match="top_p"):
    sample_lib.sample(CFG, params, key, batch_size=2, top_p=1.5)
  with pytest.raises(ValueError, match="autoregressive"):
    sample_lib.sample(CFG.replace(objective="bert"), params, key, batch_size=2)
  with pytest.raises(ValueError, match="exactly one"):
    sample_lib.prefix_length(CFG, rows=1, fraction=0.5)


def test_completion_rows_and_png_grid(tmp_path):
  palette = np.linspace(-1, 1, CFG.vocab_size * 3, dtype=np.float32).reshape(-1, 3)
  tokens = np.arange(2 * CFG.n_ctx).reshape(2, CFG.n_ctx) % CFG.vocab_size
  completions = np.stack([tokens, tokens[::-1]], axis=1)  # [2, 2, T]
  rows = sample_lib.completion_rows(tokens, completions, 8, palette, CFG.n_px)
  assert len(rows) == 2 and rows[0].shape == (4, CFG.n_px, CFG.n_px, 3)
  original = rows[0][-1]
  np.testing.assert_array_equal(rows[0][0][:2], original[:2])  # top 2 rows = 8 tokens given
  assert (rows[0][0][2:] == 128).all()  # the unseen part is grey
  np.testing.assert_array_equal(rows[1][2], rows[0][-1])  # image 1's 2nd completion = image 0

  grid = sample_lib.save_grid(tmp_path / "g.png", rows, pad=1, scale=2)
  assert grid.shape == (2 * (1 + 2 * (CFG.n_px + 1)), 2 * (1 + 4 * (CFG.n_px + 1)), 3)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), grid)
  with pytest.raises(ValueError, match="uint8"):
    sample_lib.grid_image([rows[0].astype(np.float32)])


def test_own_image_files_of_any_size_and_mode_read_as_evaluation_reads_images(tmp_path):
  from igpt_jax import data
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, (30, 44, 3), np.uint8)  # landscape: the centre 30x30 is kept
  Image.fromarray(photo).save(tmp_path / "photo.png")
  Image.fromarray(photo).convert("L").save(tmp_path / "grey.png")
  Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.png")
  rgba = np.dstack([photo, np.where(np.arange(44) < 22, 0, 255).astype(np.uint8)[None]
                    .repeat(30, 0)])  # the left half transparent
  Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
  Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
  names = ["photo.png", "grey.png", "pal.png", "clear.png", "photo.jpg"]
  got = sample_lib.read_image_files([tmp_path / n for n in names], 6)
  assert got.shape == (5, 6, 6, 3) and got.dtype == np.uint8
  # The same image through the evaluation pipeline (an image folder): the same pixels.
  (tmp_path / "folder" / "a").mkdir(parents=True)
  Image.fromarray(photo).save(tmp_path / "folder" / "a" / "0.png")
  np.testing.assert_array_equal(got[0], data.load_images({"name": str(tmp_path / "folder")},
                                                         "train", n_px=6)[0][0])
  grey = np.asarray(Image.open(tmp_path / "grey.png"))
  assert (got[1] == got[1][..., :1]).all()  # grey stays grey, in three channels
  np.testing.assert_array_equal(got[1][..., 0], data.eval_images([np.dstack([grey] * 3)], 6)[0,
                                                                                          ..., 0])
  assert abs(got[2].astype(int) - got[0]).mean() < 12  # 256 adaptive colours: close to RGB
  assert (got[3][:, :2] == 255).all()  # transparent pixels over white (centre crop cols 7..36)
  np.testing.assert_array_equal(got[3][:, 4:], got[0][:, 4:])
  assert abs(got[4].astype(int) - got[0]).mean() < 8  # JPEG of noise, averaged 5 x 5
  (tmp_path / "notes.txt").write_text("not an image")
  with pytest.raises(ValueError, match="notes.txt: not an image file"):
    sample_lib.read_image_files([tmp_path / "notes.txt"], 6)


def test_display_scale_shows_each_image_about_128_pixels_wide():
  assert [sample_lib.display_scale(n) for n in (8, 16, 32, 64, 256)] == [16, 8, 4, 2, 1]


def _run(module, *flags):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_converted_hf_weights_sample_and_complete(tmp_path):
  """A random HF ImageGPT saved the way the hub ships it, converted, then sampled/completed."""
  palette = np.random.default_rng(0).uniform(-1, 1, (CFG.vocab_size, 3))
  hf_dir = write_random_hf_imagegpt(tmp_path / "hf", palette, n_px=CFG.n_px, n_layer=CFG.n_layer,
                                    n_embd=CFG.n_embd, n_head=CFG.n_head)
  images = np.random.default_rng(1).integers(0, 256, (3, CFG.n_px, CFG.n_px, 3), np.uint8)
  np.savez(tmp_path / "images.npz", images=images, labels=np.zeros(3, np.int32))
  workdir, out = tmp_path / "converted", tmp_path / "out"

  _run("launch.convert", f"--hf_dir={hf_dir}", f"--workdir={workdir}")
  # The subprocesses inherit conftest's 8 fake devices: batches of 8 run sharded.
  _run("launch.sample", f"--workdir={workdir}", f"--out={out}", "--num=8", "--seed=1")
  tokens = np.load(out / "samples.npy")
  assert tokens.shape == (8, CFG.n_ctx) and tokens.max() < CFG.vocab_size
  assert Image.open(out / "samples.png").size[0] > 8 * CFG.n_px
  # The parameters restored split over an fsdp mesh draw the same images.
  _run("launch.sample", f"--workdir={workdir}", f"--out={tmp_path / 'fsdp'}", "--num=8",
       "--seed=1", "--mesh=1,-1,1")
  np.testing.assert_array_equal(np.load(tmp_path / "fsdp" / "samples.npy"), tokens)

  _run("launch.sample", f"--workdir={workdir}", f"--out={out}", "--complete",
       f"--data={tmp_path / 'images.npz'}", "--split=train[1:]", "--num=2",
       "--samples_per_image=4", "--prefix_rows=1")
  originals, completions = np.load(out / "originals.npy"), np.load(out / "completions.npy")
  assert originals.shape == (2, CFG.n_ctx) and completions.shape == (2, 4, CFG.n_ctx)
  np.testing.assert_array_equal(completions[:, :, :CFG.n_px],
                                np.repeat(originals[:, None, :CFG.n_px], 4, 1))
  pixels = images[1:3].reshape(2, -1, 1, 3) / 127.5 - 1
  nearest = np.argmin(((pixels - palette) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(originals, nearest)  # the converted palette tokenised them
  grid = np.asarray(Image.open(out / "completions.png"))
  assert grid.shape[1] > grid.shape[0]  # rows of 6 images: input, 4 completions, original

  # Your own files: two of other sizes and modes, in a grid upscaled as the loop's own.
  Image.fromarray(images[0].repeat(5, 0).repeat(7, 1)).save(tmp_path / "wide.png")
  Image.fromarray(images[1].repeat(9, 0).repeat(9, 1)).convert("L").save(tmp_path / "grey.jpg")
  files = [tmp_path / "wide.png", tmp_path / "grey.jpg"]
  _run("launch.sample", f"--workdir={workdir}", f"--out={tmp_path / 'mine'}", "--complete",
       "--samples_per_image=3", "--images", *map(str, files))  # as a shell glob gives them
  originals = np.load(tmp_path / "mine" / "originals.npy")
  from igpt_jax import checkpoint
  np.testing.assert_array_equal(originals, palette_lib.quantize(
      sample_lib.read_image_files(files, CFG.n_px), checkpoint.load(str(workdir))[2]))
  rows = grid_cells(Image.open(tmp_path / "mine" / "completions.png"), CFG.n_px,
                    scale=sample_lib.display_scale(CFG.n_px))
  assert [len(r) for r in rows] == [5, 5]  # input, 3 completions, original
