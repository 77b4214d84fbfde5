"""notebooks/explore.ipynb runs top to bottom, offline, on a tiny checkpoint and local images."""

import base64
import io
import json
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
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "explore.ipynb"
WHITE, GREY = (255, 255, 255), (128, 128, 128)  # grid background, hidden half of the inputs
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A weights-only checkpoint of a 4x4 model with a fitted 16-colour palette, its metrics,
  and 100 labelled 8x8 images whose colour gives the class (the notebook resizes them to 4x4,
  as it does CIFAR-10 for the 16x16 demo)."""
  d = tmp_path_factory.mktemp("notebook")
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 100)
  class_rgb = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
  coarse = class_rgb[labels][:, None, None] + rng.integers(-40, 40, (100, 2, 2, 3))
  images = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.uint8)
  np.savez(d / "images.npz", images=images, labels=labels)

  cfg = model_lib.IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=16)
  # Random weights (an initialised model's output table is zero: it would sample uniformly).
  params = jax.tree.map(lambda p: 0.2 * rng.standard_normal(p.shape, np.float32),
                        jax.eval_shape(model_lib.init_params, cfg, jax.random.key(0)))
  palette = palette_lib.fit_palette(images, k=16, steps=20, batch_size=1024)
  workdir = d / "run"
  checkpoint.save_params(str(workdir), cfg, params, palette, step=20)
  # The training loop's metrics format: a train loss every step, an eval loss now and then.
  records = [{"step": s, "train_loss": 2.8 - 0.02 * s} for s in range(1, 21)]
  records[9]["eval_loss"], records[19]["eval_loss"] = 2.7, 2.5
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return d, palette


@pytest.fixture(scope="module")
def executed(run):
  d, _ = run
  env = {**os.environ, "IGPT_WORKDIR": str(d / "run"), "IGPT_IMAGES": str(d / "images.npz"),
         # The kernel starts in a scratch directory: the package comes from the repo.
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the plots
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's kernel has (not conftest's 8)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Raises CellExecutionError (with the traceback) if any cell fails.
  NotebookClient(nb, kernel_name="python3", timeout=120,
                 resources={"metadata": {"path": str(d)}}).execute(env=env)
  return nb


def cell(nb, tag):
  (found,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  return found


def pngs(cell):
  return [np.asarray(Image.open(io.BytesIO(base64.b64decode(o.data["image/png"]))).convert("RGB"))
          for o in cell.outputs if "image/png" in o.get("data", {})]


def text(cell):
  return "".join(o.get("text", "") for o in cell.outputs)


def colours(image):
  return set(map(tuple, np.unique(image.reshape(-1, 3), axis=0).tolist()))


def test_every_code_cell_ran_and_colab_cells_did_nothing(run, executed):
  d, _ = run
  assert all(c.execution_count for c in executed.cells if c.cell_type == "code")
  assert not cell(executed, "colab").outputs and not cell(executed, "colab_train").outputs
  assert not (d / "igpt_jax").exists()  # no clone outside Colab
  assert "step 20: " in text(cell(executed, "load"))


def test_grids_show_palette_colours(run, executed):
  _, palette = run
  palette_rgb = colours(palette_lib.dequantize(np.arange(16)[None], palette, 4))  # 16 = 4x4
  (completions,) = pngs(cell(executed, "completions"))
  (samples,) = pngs(cell(executed, "samples"))
  # Every pixel is a decoded token, the background, or (completions only) the hidden half.
  assert GREY in colours(completions)
  assert colours(completions) <= palette_rgb | {WHITE, GREY}
  assert colours(samples) <= palette_rgb | {WHITE}
  assert len(colours(samples)) > 3


def test_probe_prints_accuracies(executed):
  out = text(cell(executed, "probe"))
  match = re.search(r"layer 1 probe accuracy: ([\d.]+)%  \(raw pixels: ([\d.]+)%, chance: "
                    r"([\d.]+)%\)", out)
  assert match, out
  ours, raw, chance = map(float, match.groups())
  assert 0 <= ours <= 100 and 0 <= raw <= 100 and chance == 25.0
  assert raw > chance  # the colour gives the class: images and labels reached the probe paired
  assert "90 train / 10 held-out images" in out


def test_train_and_eval_losses_are_plotted(executed):
  (plot,) = pngs(cell(executed, "metrics"))
  assert {BLUE, ORANGE} <= colours(plot)


def test_setup_cell_without_a_checkout_asks_for_the_repository_url(tmp_path):
  """Where igpt_jax is not importable and no checkout holds the notebook, the first cell stops
  with a message naming IGPT_REPO_URL: it clones nothing from a made-up address."""
  source = cell(nbformat.read(NOTEBOOK, as_version=4), "colab").source
  # -S: no site-packages, so the igpt_jax installed for the tests is not importable.
  proc = subprocess.run([sys.executable, "-S", "-c", source], cwd=tmp_path, capture_output=True,
                        text=True, env={"PATH": os.environ["PATH"]}, timeout=60)
  assert proc.returncode != 0 and "set IGPT_REPO_URL" in proc.stderr
  assert not any(tmp_path.iterdir())
