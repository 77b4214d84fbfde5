"""notebooks/explore.ipynb runs top to bottom, offline, on real CIFAR-10 images, with a tiny random
ImageGPT saved by transformers standing in for the hub download (IGPT_HF_DIR)."""

import base64
import importlib.metadata
import io
import os
import pathlib
import re
import subprocess
import sys

import jax
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from igpt_jax import checkpoint
from igpt_jax import data
from igpt_jax import metrics
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from conftest import write_random_hf_imagegpt

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "explore.ipynb"
N_PX, K = 16, 16  # the released models draw 32x32 images; a smaller stand-in is faster
WHITE, GREY = (255, 255, 255), (128, 128, 128)  # grid background, hidden half of the inputs
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  palette = np.random.default_rng(0).uniform(-1, 1, (K, 3)).astype(np.float32)
  d = tmp_path_factory.mktemp("hub") / "imagegpt-tiny"
  return write_random_hf_imagegpt(d, palette, n_px=N_PX, n_layer=2, n_embd=32, n_head=2), palette


def execute(d: pathlib.Path, **env_vars):
  """The notebook run in a kernel started in d, with env_vars in its environment."""
  env = {**os.environ, **env_vars,
         # The kernel starts in a scratch directory: the package comes from the repo.
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the plots
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's kernel has (not conftest's 8)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Raises CellExecutionError (with the traceback) if any cell fails.
  NotebookClient(nb, kernel_name="python3", timeout=600,
                 resources={"metadata": {"path": str(d)}}).execute(env=env)
  return nb


@pytest.fixture(scope="module")
def executed(hf_dir, cifar10_npz, tmp_path_factory):
  d = tmp_path_factory.mktemp("notebook")
  # IGPT_WORKDIR is the fallback's run: it must stay untouched.
  nb = execute(d, IGPT_HF_DIR=str(hf_dir[0]), IGPT_IMAGES=str(cifar10_npz),
               IGPT_WORKDIR=str(d / "demo"))
  return nb, d


@pytest.fixture(scope="module")
def fallback(cifar10_npz, tmp_path_factory):
  """The notebook with the hub out of reach (HF_HUB_OFFLINE), on a weights-only checkpoint of
  a 4x4 model with a 16-colour palette and the loop's metrics of 20 steps."""
  d = tmp_path_factory.mktemp("fallback")
  rng = np.random.default_rng(0)
  cfg = model_lib.IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=16)
  # Random weights (an initialised model's output table is zero: it would sample uniformly).
  params = jax.tree.map(lambda p: 0.2 * rng.standard_normal(p.shape, np.float32),
                        jax.eval_shape(model_lib.init_params, cfg, jax.random.key(0)))
  palette = rng.uniform(-1, 1, (16, 3)).astype(np.float32)
  checkpoint.save_params(str(d / "run"), cfg, params, palette, step=20)
  writer = metrics.Writer(d / "run")
  for step in range(1, 21):  # a train loss every step, an eval loss now and then
    writer.write(step, {"train_loss": 2.8 - 0.02 * step, **({"eval_loss": 2.6} if step % 10 == 0
                                                              else {})})
  nb = execute(d, IGPT_WORKDIR=str(d / "run"), IGPT_IMAGES=str(cifar10_npz), HF_HUB_OFFLINE="1",
               HF_HOME=str(d / "hf_home"))
  return nb, d


def cell(nb, tag):
  (found,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  return found


def pngs(cell):  # pylint: disable=redefined-outer-name
  return [np.asarray(Image.open(io.BytesIO(base64.b64decode(o.data["image/png"]))).convert("RGB"))
          for o in cell.outputs if "image/png" in o.get("data", {})]


def text(cell):  # pylint: disable=redefined-outer-name
  return "".join(o.get("text", "") for o in cell.outputs)


def colours(image):
  return set(map(tuple, np.unique(image.reshape(-1, 3), axis=0).tolist()))


@pytest.mark.slow
def test_every_cell_ran_on_the_hub_model_and_the_fallback_stayed_idle(hf_dir, executed):
  nb, d = executed
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
  assert not cell(nb, "setup").outputs and not cell(nb, "hub").outputs
  assert not cell(nb, "demo").outputs and not (d / "demo").exists()  # no demo run trained
  assert not (d / "igpt_jax").exists()  # no clone outside Colab
  assert f"{hf_dir[0]}: " in text(cell(nb, "load"))
  assert f"{K} colours, {N_PX}x{N_PX} images" in text(cell(nb, "load"))
  assert "no training curves" in text(cell(nb, "metrics"))


@pytest.mark.slow
def test_grids_show_held_out_cifar10_images_in_the_models_palette(hf_dir, executed, cifar10_npz):
  nb, _ = executed
  palette = hf_dir[1]
  palette_rgb = colours(palette_lib.dequantize(np.arange(K)[None], palette, 4))  # 16 = 4x4
  (completions,) = pngs(cell(nb, "completions"))
  (samples,) = pngs(cell(nb, "samples"))
  scale, tile = 96 // N_PX, N_PX + 2  # grid_image: 2-pixel padding, then upscaled
  side = lambda n: scale * (2 + n * tile)
  # 8 rows of prompt | 4 completions | original; 16 samples in 2 rows of 8.
  assert completions.shape[:2] == (side(8), side(6))
  assert samples.shape[:2] == (side(2), side(8))
  # The originals are the first held-out CIFAR-10 images (the file's last 5,000), quantized.
  images, _ = data.load_images({"name": str(cifar10_npz)}, "train[45000:]", 8, n_px=N_PX)
  want = palette_lib.dequantize(palette_lib.quantize(images, palette), palette,
                                N_PX).repeat(scale, axis=1).repeat(scale, axis=2)
  at = lambda i, j: completions[scale * (2 + i * tile):, scale * (2 + j * tile):][
      :scale * N_PX, :scale * N_PX]
  for i in range(8):
    np.testing.assert_array_equal(at(i, 5), want[i])
    np.testing.assert_array_equal(at(i, 0)[:scale * N_PX // 2], want[i][:scale * N_PX // 2])
    assert (at(i, 0)[scale * N_PX // 2:] == GREY).all()
  # Your own files: test images 8 (a 3x larger RGBA PNG, read back to the same 16x16) and 9
  # (a grayscale JPEG), each beside its 4 completions.
  (mine,) = pngs(cell(nb, "own_images"))
  assert mine.shape[:2] == (side(2), side(6))
  images, _ = data.load_images({"name": str(cifar10_npz)}, "train[45000:]", 9, n_px=N_PX)
  original = palette_lib.dequantize(palette_lib.quantize(images[8:9], palette), palette, N_PX)
  np.testing.assert_array_equal(mine[scale * 2:, scale * (2 + 5 * tile):][:scale * N_PX,
                                                                        :scale * N_PX],
                                original[0].repeat(scale, axis=0).repeat(scale, axis=1))
  # Every pixel is a decoded token, the background, or (completions only) the hidden half.
  assert colours(completions) <= palette_rgb | {WHITE, GREY}
  assert colours(samples) <= palette_rgb | {WHITE}
  assert len(colours(samples)) > 3


@pytest.mark.slow
def test_probe_of_a_middle_layer_against_raw_pixels_on_cifar10(executed):
  nb, _ = executed
  out = text(cell(nb, "probe"))
  match = re.search(r"layer 1 probe accuracy: ([\d.]+)%  \(raw pixels: ([\d.]+)%, chance: "
                    r"([\d.]+)%\)", out)
  assert match, out
  ours, raw, chance = map(float, match.groups())
  assert 0 <= ours <= 100 and chance == 10.0
  # Real images and their labels reached the probe paired: pixels beat chance by far.
  assert raw > 2 * chance
  assert "1000 train / 500 test images" in out


def test_setup_cell_keeps_the_installed_jax(monkeypatch, tmp_path):
  """The setup cell's pip call pins the jax and jaxlib that are installed (a Colab GPU or TPU
  build), so installing the package can never replace them."""
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args))
  namespace = {}
  exec(cell(nbformat.read(NOTEBOOK, as_version=4), "setup").source, namespace)  # pylint: disable=exec-used
  assert not calls  # igpt_jax is importable here: the cell installs nothing
  namespace["pip_install"](str(tmp_path))
  (args,) = calls
  constraints = pathlib.Path(args[args.index("-c") + 1]).read_text().split()
  assert f"jax=={importlib.metadata.version('jax')}" in constraints
  assert f"jaxlib=={importlib.metadata.version('jaxlib')}" in constraints
  assert args[-2:] == ["-e", str(tmp_path)]


def test_setup_cell_without_a_checkout_asks_for_the_repository_url(tmp_path):
  """Where igpt_jax is not importable and no checkout holds the notebook, the first cell stops
  with a message naming IGPT_REPO_URL: it clones nothing from a made-up address."""
  source = cell(nbformat.read(NOTEBOOK, as_version=4), "setup").source
  # -S: no site-packages, so the igpt_jax installed for the tests is not importable.
  proc = subprocess.run([sys.executable, "-S", "-c", source], cwd=tmp_path, capture_output=True,
                        text=True, env={"PATH": os.environ["PATH"]}, timeout=60)
  assert proc.returncode != 0 and "set IGPT_REPO_URL" in proc.stderr
  assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_without_the_hub_the_notebook_loads_the_run_and_plots_its_losses(fallback):
  nb, d = fallback
  assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
  assert "could not download openai/imagegpt-small" in text(cell(nb, "hub"))
  assert f"{d / 'run'} (step 20): " in text(cell(nb, "load"))
  assert checkpoint.steps(str(d / "run")) == [20]  # loaded as it is, not trained
  (plot,) = pngs(cell(nb, "metrics"))
  assert {BLUE, ORANGE} <= colours(plot)
