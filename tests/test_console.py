"""The console: what gets through the log filter, progress lines off a terminal, and every
launch script run as a user runs it, with no third-party noise on its console; two runs of the
same probe give the same results."""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from igpt_jax import checkpoint
from igpt_jax import console
from igpt_jax import convert
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from conftest import labelled_images

REPO = pathlib.Path(__file__).resolve().parents[1]


def _record(path, level, msg):
  return logging.LogRecord("x", level, path, 1, msg, None, None)


def test_filter_passes_ours_and_warnings_not_other_info(monkeypatch):
  keep = console._ConsoleFilter().filter
  assert keep(_record(str(REPO / "igpt_jax" / "train.py"), logging.INFO, "step 1"))
  assert keep(_record(str(REPO / "launch" / "train.py"), logging.INFO, "wrote"))
  orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not keep(_record(orbax, logging.INFO, "Saving checkpoint"))
  assert keep(_record(orbax, logging.WARNING, "something real"))
  assert keep(_record("/venv/site-packages/jax/_src/x.py", logging.ERROR, "boom"))
  tpu = _record("/venv/site-packages/jax/_src/xla_bridge.py", logging.INFO,
                "Unable to initialize backend 'tpu': INTERNAL: no TPU")
  monkeypatch.setattr(console, "_has_tpu_chips", lambda: False)
  assert not keep(tpu)
  monkeypatch.setattr(console, "_has_tpu_chips", lambda: True)  # then it matters: a warning
  assert keep(tpu) and tpu.levelno == logging.WARNING


def test_progress_off_a_terminal_prints_plain_lines(capsys):
  with console.progress(desc="features", total=4, unit="img") as bar:
    for _ in range(4):
      bar.update(1)
  with console.status("fitting"):
    pass
  calls = []
  fn = console.first_call(lambda x: calls.append(x) or x, "compiling")
  assert fn(1) == 1 and fn(2) == 2 and calls == [1, 2]
  err = capsys.readouterr().err
  assert "\r" not in err
  lines = err.splitlines()
  assert lines[0].startswith("features:   0%") and lines[1].startswith("features: 100%")
  assert "4/4" in lines[1]
  assert lines[2:] == ["fitting: 00:00", "fitting: 00:00, done", "compiling: 00:00",
                       "compiling: 00:00, done"]


def test_progress_lines_of_a_desc_with_brackets_are_not_taken_for_repeats(capsys):
  with console.progress(desc="token features of train (layers [3])", total=2) as bar:
    bar.update(2)
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 2 and "2/2" in lines[1]  # the final count, not dropped as a repeat


# -- every launch script, as a user runs it -------------------------------------------------

# What the issue saw on every console (TensorFlow's oneDNN and CPU-feature banners, jax trying
# the TPU backend, orbax warning on the probe's read-only open) and kin.
BANNED = ("oneDNN", "cpu_feature_guard", "absl::InitializeLog", "Unable to initialize backend",
          "Given directory is read only", "fontManager",
          "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "libtpu")  # libtpu's own start-up
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ")
OWN_FILES = {p.name for d in ("igpt_jax", "launch") for p in (REPO / d).rglob("*.py")}


@pytest.fixture(scope="module")
def consoles(tmp_path_factory):
  """{script: console output (stdout and stderr)} of each launch script on a tiny model."""
  d = tmp_path_factory.mktemp("console")
  images, labels = labelled_images(64, 4)
  np.savez(d / "images.npz", images=images, labels=labels)
  cfg = model_lib.IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=16)
  params = model_lib.init_params(cfg, jax.random.key(0))
  palette = palette_lib.fit_palette(images, k=16, steps=5, batch_size=256)
  for run in ("pre", "pre_again"):
    checkpoint.save_params(str(d / run), cfg, params, palette)
  for step in (1, 2):  # a run with two checkpoints and its held-out losses
    checkpoint.save_params(str(d / "steps"), cfg, params, palette, step=step)
  (d / "steps" / "metrics.jsonl").write_text(
      "".join(json.dumps({"step": s, "eval_loss": 3.0 - s}) + "\n" for s in (1, 2)))
  convert.write_hf_dir(str(d / "hf"), cfg, params, palette)
  data = [f"--config.data.name={d / 'images.npz'}", "--config.data.train_split=train[:48]",
          "--config.data.eval_split=train[48:]"]
  probe = [f"--config={REPO / 'experiments' / 'probe_cifar10_tiny.py'}",
           "--config.batch_size=8", "--config.low_data.seeds=2", "--config.low_data.sizes=(8,)",
           "--config.l2s=(0.01,0.1)", *data]
  runs = {
      "fit_palette": ["--data", d / "images.npz", "--k=16", "--images=64", "--steps=5",
                      f"--out={d / 'palette.npy'}"],
      "train": [f"--config={REPO / 'experiments' / 'tiny_test.py'}", f"--workdir={d / 'run'}",
                "--config.total_steps=4", "--config.log_every=2",
                "--config.sample_every=4", *data],
      "probe": [*probe, "--baselines", f"--workdir={d / 'pre'}"],
      "probe_again": [*probe, "--baselines", f"--workdir={d / 'pre_again'}"],
      "probe_checkpoints": [*probe, "--checkpoints=all", f"--workdir={d / 'steps'}"],
      "sample": [f"--workdir={d / 'pre'}", "--num=2", f"--out={d / 'samples'}"],
      "convert": [f"--hf_dir={d / 'hf'}", f"--workdir={d / 'converted'}"],
      "finetune": [f"--config={REPO / 'experiments' / 'finetune_cifar10_tiny.py'}",
                   f"--config.init_workdir={d / 'pre'}", f"--workdir={d / 'ft'}",
                   "--config.n_classes=4", "--config.batch_size=8", "--config.total_steps=2",
                   "--config.eval_every=2", "--config.data.augment=none",
                   "--config.test_split=", *data],
  }
  # A user's environment: no device count or platform forced (conftest sets both for tests).
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  script = {"probe_again": "probe", "probe_checkpoints": "probe"}
  procs = {name: subprocess.Popen([sys.executable, "-m", f"launch.{script.get(name, name)}",
                                   *map(str, flags)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
           for name, flags in runs.items()}  # concurrently: most of each is start-up
  out = {}
  for name, proc in procs.items():
    out[name] = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"launch/{name}.py failed:\n{out[name][-3000:]}"
  return d, out


@pytest.mark.slow
@pytest.mark.parametrize("script", ["fit_palette", "train", "probe", "probe_checkpoints",
                                    "sample", "convert", "finetune"])
def test_launch_script_console_has_no_noise(consoles, script):
  for line in consoles[1][script].splitlines():
    assert not any(b in line for b in BANNED), f"launch/{script}.py printed: {line}"
    m = ABSL_LINE.match(line)
    assert not (m and m.group(1) == "I" and m.group(2) not in OWN_FILES), (
        f"launch/{script}.py printed another library's INFO line: {line}")


@pytest.mark.slow
def test_launch_scripts_show_progress(consoles):
  consoles = consoles[1]
  assert "fitting a 16-colour palette" in consoles["train"]
  assert "compiling the train step" in consoles["train"]
  assert re.search(r"features of train \(train\[:48\]\): 100%.*48/48", consoles["probe"])
  assert "probing 3 layers: 100%" in consoles["probe"]
  assert consoles["probe_checkpoints"].count("probing 3 layers: 100%") == 2
  assert "sampling 2 images" in consoles["sample"]
  assert "reading and converting" in consoles["convert"]


@pytest.mark.slow
def test_the_same_probe_twice_gives_the_same_results(consoles):
  """Two processes at once (so their threads compete) on equal checkpoints: equal files."""
  d, _ = consoles
  first, again = (json.loads((d / run / "probe" / "results.json").read_text())
                  for run in ("pre", "pre_again"))
  assert first.pop("workdir") != again.pop("workdir")
  # Feature sets are named by what they hold, the checkpoint's workdir included.
  sets = first.pop("features"), again.pop("features")
  assert first == again
  for role in ("train", "test"):
    a, b = (d / run / "probe" / "features" / s[role] for run, s in zip(("pre", "pre_again"), sets))
    files = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file() and f.name != "spec.json")
    assert files  # shards of every feature and their completion markers
    for f in files:
      assert (a / f).read_bytes() == (b / f).read_bytes(), f
    spec_a, spec_b = (json.loads((x / "spec.json").read_text()) for x in (a, b))
    assert spec_a["spec"].pop("workdir") != spec_b["spec"].pop("workdir")
    assert spec_a.pop("key") != spec_b.pop("key") and spec_a == spec_b
