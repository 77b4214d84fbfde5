"""Runs that live in a bucket, against a real GCS server on localhost (conftest's `gcs`).

What goes through our path layer (igpt_jax/paths.py: etils.epath on gcsfs) and orbax's
TensorStore is tested here end to end. TensorFlow's own GCS filesystem ignores emulators, so the
two paths it reads itself are covered this far: a tfds `data_dir` in a bucket passes our checks
and reaches tfds unchanged (`test_tfds_data_dir_in_a_bucket_reaches_tfds`), and an image
folder's listing and labels come from the bucket (`test_data_from_a_bucket`); the files' bytes
are then `tf.io.read_file` of the gs:// names.
"""
# pylint: disable=protected-access  (data's source readers are what these tests check)

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from experiments import finetune_cifar10_tiny
from experiments import probe_cifar10_tiny
from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import data as data_lib
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from igpt_jax import paths
from igpt_jax import probe
from igpt_jax import sample
from igpt_jax import train
from conftest import GCS_BUCKET, PAIR_STEPS, STEPS, launch, launch_pair

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = model_lib.IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=16)
PALETTE = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)


def url(*parts: str) -> str:
  return "/".join([f"gs://{GCS_BUCKET}", *parts])


def nothing_local_named_gs(*roots) -> bool:
  """No `gs:` directory where a gs:// path taken for a local one would have gone."""
  return not any((pathlib.Path(r) / "gs:").exists() for r in (os.getcwd(), REPO, *roots))


def test_path_layer_round_trips_in_a_bucket(gcs):
  del gcs
  root = paths.path(url("paths"))
  paths.write_json(root / "a.json", {"x": [1, 2]})
  paths.save_npy(root / "sub" / "a.npy", np.arange(6).reshape(2, 3))
  assert paths.read_json(root / "a.json") == {"x": [1, 2]}
  np.testing.assert_array_equal(paths.load_npy(root / "sub" / "a.npy"), np.arange(6).reshape(2, 3))
  for i in range(5):
    paths.append_bytes(root / "log.txt", f"line {i}\n".encode())
  assert (root / "log.txt").read_text() == "".join(f"line {i}\n" for i in range(5))
  paths.move(root / "sub", root / "moved" / "sub")
  assert not (root / "sub").exists() and (root / "moved" / "sub" / "a.npy").exists()
  assert sorted(p.name for p in root.iterdir()) == ["a.json", "log.txt", "moved"]  # no parts
  assert paths.remote(root) and paths.absolute(root) == url("paths")
  assert nothing_local_named_gs()


def test_checkpoint_in_a_bucket_loads_from_python(gcs):
  del gcs
  params = model_lib.init_params(CFG, jax.random.key(0))
  workdir = url("ckpt")
  ckpt_lib.save_params(workdir, CFG, params, PALETTE, step=3)
  assert (paths.path(workdir) / "checkpoints" / "3").is_dir()
  cfg, loaded, palette = ckpt_lib.load(workdir)
  assert cfg == CFG and ckpt_lib.steps(workdir) == [3]
  np.testing.assert_array_equal(palette, PALETTE)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    ckpt_lib.load(url("no_such_run"))
  assert nothing_local_named_gs()


def test_server_stopped_mid_save_retries_and_keeps_the_previous_checkpoint(gcs):
  """The server goes away while a save is under way and comes back 3 s later: the save either
  completes (TensorStore and gcsfs retry) or fails with an error, within a bound, never hangs;
  the previous checkpoint restores either way."""
  workdir = url("outage")
  big = {"w": np.random.default_rng(0).normal(size=(2048, 2048)).astype(np.float32)}  # 16 MB
  mngr = ckpt_lib.manager(workdir, keep=None)
  ckpt_lib.save(mngr, 1, big, None, {"step": 1}, force=True)
  mngr.wait_until_finished()
  ckpt_lib.save(mngr, 2, {"w": big["w"] + 1}, None, {"step": 2}, force=True)
  time.sleep(0.2)
  saving = mngr.is_saving_in_progress()
  gcs.stop()
  outcome = []

  def finish():
    try:
      mngr.wait_until_finished()
      outcome.append("saved")
    except Exception as e:  # pylint: disable=broad-except
      outcome.append(e)

  waiter = threading.Thread(target=finish, daemon=True)
  waiter.start()
  time.sleep(3)
  gcs.start()
  waiter.join(timeout=180)
  assert saving, "the save had finished before the server stopped: use a larger array"
  assert outcome, "wait_until_finished still blocked 3 minutes after the server came back"
  restored = ckpt_lib.manager(workdir, read_only=True).restore(
      1, args=ckpt_lib.ocp.args.Composite(params=ckpt_lib.ocp.args.StandardRestore()))
  np.testing.assert_array_equal(restored["params"]["w"], big["w"])
  if outcome == ["saved"]:
    assert ckpt_lib.manager(workdir, read_only=True).all_steps() == [1, 2]


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
  """A local image folder root/folder/<split>/<class>/*.png and root/images.npz."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for split, n in (("train", 3), ("test", 2)):
    for cls in ("cat", "dog"):
      (root / "folder" / split / cls).mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), np.uint8)).save(
            root / "folder" / split / cls / f"{i}.png")
  np.savez(root / "images.npz", images=rng.integers(0, 256, (24, 4, 4, 3), np.uint8),
           labels=rng.integers(0, 3, 24))
  return root


def test_data_from_a_bucket(gcs, image_tree):
  del gcs
  remote = paths.path(url("images"))
  for f in image_tree.rglob("*"):
    if f.is_file():
      (remote / f.relative_to(image_tree)).write_bytes(f.read_bytes())
  kw = dict(batch_size=8, palette=PALETTE, n_px=4, train=False)
  local_npz, bucket_npz = ({"name": os.fspath(r / "images.npz")} for r in (image_tree, remote))
  for a, b in zip(data_lib.make_dataset(local_npz, split="train[:20]", **kw),
                  data_lib.make_dataset(bucket_npz, split="train[:20]", **kw)):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert data_lib.num_examples(bucket_npz, "train[4:]") == 20
  for split in ("train", "test"):
    local_files, local_labels = data_lib._local_split(os.fspath(image_tree / "folder"), split)
    files, labels = data_lib._local_split(os.fspath(remote / "folder"), split)
    assert all(f.startswith(url("images", "folder")) for f in files)
    assert [f.replace(os.fspath(remote), os.fspath(image_tree)) for f in files] == list(
        local_files)
    np.testing.assert_array_equal(labels, local_labels)


def test_tfds_data_dir_in_a_bucket_reaches_tfds(gcs, monkeypatch):
  del gcs
  paths.write_json(url("tensorflow_datasets", "cifar10", "marker.json"), {})
  with pytest.raises(ValueError, match="does not exist"):
    data_lib._tfds_source("cifar10", url("no_tfds_here"), "train", 0, 1)

  seen = []

  class Builder:  # stands in for tfds: TensorFlow would read the records from the bucket
    def __init__(self, name, data_dir):
      seen.append((name, data_dir))
      raise RuntimeError("tfds reached")

  monkeypatch.setattr(data_lib._tfds(), "builder", Builder)
  with pytest.raises(RuntimeError, match="tfds reached"):
    data_lib._tfds_source("cifar10", url("tensorflow_datasets"), "train", 0, 1)
  assert seen == [("cifar10", url("tensorflow_datasets"))]


def test_palette_in_a_bucket(gcs):
  del gcs
  palette_lib.save_palette(url("palettes", "p.npy"), PALETTE)
  np.testing.assert_array_equal(palette_lib.load_palette(url("palettes", "p.npy"), k=16), PALETTE)
  with pytest.raises(ValueError, match="does not exist"):
    palette_lib.load_palette(url("palettes", "missing.npy"))


@pytest.fixture(scope="module")
def bucket_files(gcs, files):
  """conftest's `files` (a 64-image .npz and a 16-colour palette), copied into the bucket."""
  del gcs
  out = (url("data", "images.npz"), url("data", "palette.npy"))
  for local, remote in zip(files, out):
    paths.path(remote).write_bytes(pathlib.Path(local).read_bytes())
  return out


@pytest.mark.slow
def test_a_tpu_runs_checkpoint_probes_samples_and_finetunes_here(bucket_files):
  """A checkpoint whose model says splash and bfloat16, as a TPU run wrote them before
  checkpoints recorded the configured model: everything runs on this CPU, from the bucket."""
  tpu = CFG.replace(attention="splash", dtype="bfloat16")
  workdir = url("tpu_run")
  ckpt_lib.save_params(workdir, tpu, model_lib.init_params(tpu, jax.random.key(0)), PALETTE)
  cfg, params, _ = ckpt_lib.load(workdir)
  assert (cfg.attention, cfg.dtype) == ("auto", "bfloat16")
  assert ckpt_lib.load(workdir, attention="xla", dtype="float32")[0].replace(
      attention="splash", dtype="bfloat16") == tpu

  config = probe_cifar10_tiny.get_config()
  config.data = dict(name=bucket_files[0], train_split="train[:48]", eval_split="train[48:]")
  config.update(batch_size=8, l2s=(1e-1,), concat_k=1, low_data=dict(sizes=(), seeds=1))
  results = probe.run(config, workdir)
  assert paths.read_json(url("tpu_run", "probe", "results.json"))["summary"] == json_round(
      results["summary"])
  assert (paths.path(workdir) / "probe" / "accuracy_by_layer.png").exists()

  tokens = sample.sample(cfg, params, jax.random.key(0), batch_size=2)
  assert tokens.shape == (2, CFG.n_ctx)

  ft = finetune_cifar10_tiny.get_config()
  ft.update(init_workdir=workdir, n_classes=10, batch_size=8, total_steps=2, eval_every=2,
            checkpoint_every=2, log_every=1, eval_batches=1, test_split="")
  ft.data = dict(name=bucket_files[0], train_split="train[:48]", eval_split="train[48:]")
  last = train.train_and_evaluate(ft, url("tpu_run_ft"))
  assert 0 <= last["best_eval_accuracy"] <= 1
  saved = ckpt_lib.read_meta(url("tpu_run_ft"))["model"]
  assert (saved["attention"], saved["dtype"]) == ("auto", "bfloat16")
  assert nothing_local_named_gs()


def json_round(obj):
  return json.loads(json.dumps(obj))


# -- whole runs in the bucket, through the launch scripts ------------------------------------

def wait_for_step(proc, workdir, step: int):
  """Polls the bucket's metrics (twice a second: the emulator serves one request at a time)
  until `step` is logged; False if the process ended first."""
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if max(metrics_lib.read(workdir), default=0) >= step:
      return True
    time.sleep(0.5)
  return False


def finish(proc, timeout=600) -> str:
  _, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return err


@pytest.fixture(scope="module")
def bucket_run(bucket_files):
  """launch/train.py with --workdir in the bucket, data from it, its palette fitted into it."""
  workdir = url("runs", "whole")
  finish(launch((bucket_files[0], ""), workdir))
  return workdir


@pytest.mark.slow
def test_a_run_in_a_bucket_writes_everything_there(bucket_run):
  root = paths.path(bucket_run)
  names = {p.name for p in root.iterdir()}
  assert {"checkpoints", "metrics.jsonl", "palette.npy", f"samples_{STEPS:07d}.png"
          } <= names
  assert any(n.startswith("events.out.tfevents") for n in names)
  assert sorted(metrics_lib.read(bucket_run)) == list(range(1, STEPS + 1))
  assert ckpt_lib.steps(bucket_run)[-1] == STEPS
  assert ckpt_lib.read_meta(bucket_run)["model"]["attention"] == "auto"  # as configured
  palette_lib.load_palette(root / "palette.npy", k=16)
  assert nothing_local_named_gs()


@pytest.mark.slow
def test_sigterm_and_restart_from_the_bucket_equal_an_uninterrupted_run(bucket_run):
  workdir = url("runs", "cut")
  palette = f"{bucket_run}/palette.npy"  # the whole run's, so the two runs see the same tokens
  proc = launch((url("data", "images.npz"), palette), workdir)
  assert wait_for_step(proc, workdir, 35)
  proc.send_signal(signal.SIGTERM)
  assert "preempted: saved step" in finish(proc)
  resumed_from = ckpt_lib.steps(workdir)[-1]
  assert 35 <= resumed_from < STEPS
  err = finish(launch((url("data", "images.npz"), palette), workdir))
  assert f"resumed from step {resumed_from}" in err
  want, got = metrics_lib.read(bucket_run), metrics_lib.read(workdir)
  after = range(resumed_from + 1, STEPS + 1)
  np.testing.assert_array_equal([got[s]["train_loss"] for s in after],
                                [want[s]["train_loss"] for s in after])
  assert got[STEPS]["eval_loss"] == want[STEPS]["eval_loss"]
  assert nothing_local_named_gs()


@pytest.mark.slow
def test_two_processes_write_one_run_in_the_bucket(bucket_files):
  workdir = url("runs", "pair")
  for proc in launch_pair(bucket_files, workdir):
    finish(proc)
  assert sorted(metrics_lib.read(workdir)) == list(range(1, PAIR_STEPS + 1))
  assert ckpt_lib.steps(workdir)[-1] == PAIR_STEPS
  ckpt_lib.load(workdir)
  assert nothing_local_named_gs()


def run_script(module: str, *args: str) -> str:
  proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return finish(proc)


@pytest.mark.slow
def test_probe_finetune_and_sample_read_the_run_from_the_bucket(bucket_run, bucket_files):
  data = bucket_files[0]
  run_script("launch.probe", "--config=experiments/probe_cifar10_tiny.py",
             f"--workdir={bucket_run}", f"--config.data.name={data}",
             "--config.data.train_split=train[:48]", "--config.data.eval_split=train[48:]",
             "--config.batch_size=8", "--config.l2s=(0.1,)", "--config.concat_k=1",
             "--config.low_data.sizes=()")
  results = paths.read_json(f"{bucket_run}/probe/results.json")
  assert results["workdir"] == bucket_run and results["n_test"] == 16
  ft = url("runs", "finetuned")
  run_script("launch.finetune", "--config=experiments/finetune_cifar10_tiny.py",
             f"--workdir={ft}", f"--config.init_workdir={bucket_run}",
             f"--config.data.name={data}", "--config.data.train_split=train[:40]",
             "--config.data.eval_split=train[40:48]", "--config.test_split=train[48:]",
             "--config.n_classes=10", "--config.batch_size=8", "--config.total_steps=4",
             "--config.eval_every=2", "--config.checkpoint_every=2")
  assert set(paths.read_json(f"{ft}/finetune_results.json")) == {
      "best_step", "held_out_accuracy", "test_accuracy"}
  run_script("launch.sample", f"--workdir={bucket_run}", "--num=2")
  assert paths.load_npy(f"{bucket_run}/samples/samples.npy").shape == (2, 16)
  assert (paths.path(bucket_run) / "samples" / "samples.png").exists()
  assert nothing_local_named_gs()
