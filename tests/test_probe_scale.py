"""The probe at ImageNet scale: resumable feature shards, the streaming SGD probe against L-BFGS,
its memory bound, 2-process extraction and probe equal to 1 process, launch/probe.py with the
ImageNet config on a local image-folder stand-in."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import model as model_lib
from igpt_jax import probe
from igpt_jax import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = model_lib.IGPTConfig(n_px=8, n_layer=2, n_embd=32, n_head=2, vocab_size=16)


def _blobs(n, seed, n_classes=10, dim=48):
  centres = np.random.default_rng(99).normal(0, 0.4, (n_classes, dim))
  rng = np.random.default_rng(seed)
  y = rng.integers(0, n_classes, n)
  return (centres[y] + rng.normal(0, 1, (n, dim))).astype(np.float32), y.astype(np.int32)


def _write(out_dir, split, x, y, batch, featurize=None, **opts):
  batches = [{"tokens": x[i:i + batch], "labels": y[i:i + batch]}
             for i in range(0, len(x), batch)]
  featurize = featurize or (lambda t, index: {"layer00": t})
  return probe.write_features(batches, featurize, str(out_dir), split, rows=len(x), **opts)


def test_interrupted_extraction_resumes_without_recomputing_finished_shards(tmp_path):
  x, y = _blobs(24, 0)
  calls = []

  def featurize(tokens, index):
    calls.append(index)
    if stop_at is not None and index == stop_at:
      raise KeyboardInterrupt  # a preemption while batch 4 runs
    return {"layer00": 2 * tokens}

  stop_at = 4
  with pytest.raises(KeyboardInterrupt):  # batches of 4, shards of 2 batches: 3 shards
    _write(tmp_path / "cut", "train", x, y, 4, featurize, shard_batches=2)
  # Shard 0 was complete (marked); shard 1's batch 3 was fetched but its marker not written.
  assert [s["shard"] for s in probe.shards(tmp_path / "cut", "train")] == [0]
  calls.clear()
  stop_at = None
  done = _write(tmp_path / "cut", "train", x, y, 4, featurize, shard_batches=2)
  assert calls == [2, 3, 4, 5]  # shard 0's batches 0 and 1 are not featurized again
  assert [(s["shard"], s["rows"]) for s in done] == [(0, 8), (1, 8), (2, 8)]
  np.testing.assert_array_equal(probe.load_feature(tmp_path / "cut", "train", "layer00"), 2 * x)
  np.testing.assert_array_equal(probe.load_feature(tmp_path / "cut", "train", "labels"), y)
  calls.clear()
  _write(tmp_path / "cut", "train", x, y, 4, featurize, shard_batches=2)
  assert not calls  # a finished extraction reruns as a no-op
  _write(tmp_path / "cut", "train", x, y, 4, featurize, shard_batches=2, dtype="bfloat16")
  assert calls == list(range(6))  # shards of another dtype are not taken as done


def test_bfloat16_shards_hold_the_rounded_features(tmp_path):
  x, y = _blobs(10, 1)
  _write(tmp_path, "train", x, y, 4, dtype="bfloat16")
  got = probe.load_feature(tmp_path, "train", "layer00")
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, x.astype(jax.numpy.bfloat16).astype(np.float32))
  header = os.path.getsize(probe.feature_path(tmp_path, "train", 0)) - 10 * 48 * 2
  assert 0 < header <= 128  # two bytes a value
  with pytest.raises(ValueError, match="feature dtype 'float16'"):
    _write(tmp_path / "bad", "train", x, y, 4, dtype="float16")


def test_solver_by_size():
  assert probe.solver_for("auto", 50_000, 1536, 8 * 2 ** 30) == "lbfgs"  # CIFAR, iGPT-L
  assert probe.solver_for("auto", 1_281_167, 1536, 8 * 2 ** 30) == "sgd"  # ImageNet
  assert probe.solver_for("lbfgs", 1_281_167, 1536, 1) == "lbfgs"
  with pytest.raises(ValueError, match="solver 'adam'"):
    probe.solver_for("adam", 1, 1, 1)


# Margin of the streaming probe against L-BFGS on the same features, in accuracy points: both
# pick their hyperparameters on held-out train rows of their own (L-BFGS also refits on all of
# train), so they differ by a fit's noise on these test sets, not by the optimum.
MARGIN = 0.02


def _lbfgs(feat_dir, names, l2s, val_fraction):
  data = [probe.load_feature(feat_dir, s, n) for s in ("train", "test") for n in (names, "labels")]
  return probe.linear_probe(*data, l2s=l2s, val_fraction=val_fraction)


def test_streaming_probe_reaches_lbfgs_on_blobs(tmp_path):
  for split, n, seed in (("train", 6000, 1), ("test", 2000, 2)):
    _write(tmp_path, split, *_blobs(n, seed), 500, shard_batches=3, dtype="bfloat16")
  mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])  # data parallel over 2 devices
  got = probe.stream_probe(tmp_path, ["layer00"], mesh=mesh, lrs=(0.1, 0.3), l2s=(1e-4, 1e-3),
                           epochs=5, batch_size=256, val_fraction=0.1, chunk_rows=700)
  want = _lbfgs(tmp_path, ["layer00"], (1e-4, 1e-3), 0.1)
  assert 0.5 < want["accuracy"] < 0.99  # neither trivial nor hopeless
  assert abs(got["accuracy"] - want["accuracy"]) <= MARGIN
  assert set(want) <= set(got) and got["solver"] == "sgd"
  assert got["iterations"] == 5 * (got["n_fit"] // 256)
  assert got["val_loss"][got["l2"]] == min(r["val_loss"] for r in got["grid"])
  assert got["n_fit"] + got["n_val"] == 6000
  # Two layers side by side, concatenated shard by shard as the probe reads them.
  cat = probe.stream_probe(tmp_path, ["layer00", "layer00"], mesh=mesh, epochs=1,
                           batch_size=256, val_fraction=0.1)
  assert 0.5 < cat["accuracy"]


def _checkpoint(workdir):
  """A weights-only checkpoint of CFG (random init) with a random 16-colour palette."""
  palette = np.random.default_rng(1).uniform(-1, 1, (CFG.vocab_size, 3)).astype(np.float32)
  ckpt_lib.save_params(str(workdir), CFG, model_lib.init_params(CFG, jax.random.key(0)),
                       palette)
  return workdir


def _config(name, train_split, eval_split, **overrides):
  from experiments import probe_cifar10_tiny  # pylint: disable=import-outside-toplevel
  config = probe_cifar10_tiny.get_config()
  config.data = dict(name=str(name), train_split=train_split, eval_split=eval_split)
  config.update(dict(batch_size=64, concat_k=1, reading="ln1", l2s=(1e-2, 1e-1),
                     low_data=dict(sizes=(), seeds=1, balanced=True), **overrides))
  return config


@pytest.mark.slow
def test_streaming_probe_reaches_lbfgs_on_real_cifar_features(cifar10_npz, tmp_path):
  """Real CIFAR-10 images (../shared/data) through the local-data path and a random-init
  model: the layers' probes by L-BFGS, then by SGD on the same shards (not re-extracted)."""
  config = _config(cifar10_npz, "train[:4000]", "train[45000:46000]", solver="lbfgs")
  checkpoint_dir, out = _checkpoint(tmp_path / "run"), tmp_path / "probe"
  lbfgs = probe.run(config, str(checkpoint_dir), out_dir=str(out))
  mtimes = {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*.npy")}
  config.solver = "sgd"
  config.sgd = dict(lrs=(0.03, 0.1, 0.3), epochs=10, batch_size=256, chunk_rows=2048)
  sgd = probe.run(config, str(checkpoint_dir), out_dir=str(out))
  assert {p: p.stat().st_mtime_ns for p in (out / "features").rglob("*.npy")} == mtimes
  for layer, want in lbfgs["pretrained"]["layers"].items():
    got = sgd["pretrained"]["layers"][layer]
    assert got["solver"] == "sgd" and want["solver"] == "lbfgs"
    assert 0.2 < want["accuracy"]  # ten classes: well above chance
    assert abs(got["accuracy"] - want["accuracy"]) <= MARGIN, (layer, got, want)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from igpt_jax import console, probe, sharding
    console.setup()

    def status(field):  # bytes
      with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith(field + ":")).split()[1]) * 1024

    opts = dict(mesh=sharding.make_mesh((-1, 1, 1)), epochs=1, batch_size=1024,
                chunk_rows=4096, lrs=(0.1,), l2s=(1e-4,))
    probe.stream_probe(sys.argv[1], ["layer00"], **opts)  # compiles the same programs
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # the high-water mark starts again here
      f.write("5")
    result = probe.stream_probe(sys.argv[2], ["layer00"], **opts)
    peak = status("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "accuracy": result["accuracy"]}))
""")


def _write_random(out_dir, rows: int, dim: int):
  """Train and test splits of random bfloat16 features, drawn a batch at a time."""
  rng = np.random.default_rng(0)

  def batches():
    for i in range(0, rows, 4096):
      b = min(4096, rows - i)
      yield {"tokens": rng.normal(size=(b, dim)).astype(np.float32),
             "labels": rng.integers(0, 10, b).astype(np.int32)}
  for split in ("train", "test"):
    probe.write_features(batches(), lambda t, i: {"layer00": t}, out_dir, split, rows=rows,
                         shard_batches=8, dtype="bfloat16")


@pytest.mark.slow
def test_streaming_probe_memory_stays_bounded(tmp_path):
  """A train split 4x the bound on disk (bfloat16); the probe's growth in resident memory over
  the process before it stays under the bound. Measured in a subprocess by its high-water mark
  (VmHWM), reset just before the probe: ru_maxrss would carry this test process's own peak,
  which a child keeps across fork and exec."""
  bound, dim = 128 * 2 ** 20, 1024
  _write_random(tmp_path / "small", 8192, dim)
  _write_random(tmp_path / "big", 4 * bound // (2 * dim), dim)
  on_disk = sum(p.stat().st_size for p in (tmp_path / "big" / "train").rglob("*.npy"))
  assert on_disk >= 4 * bound
  out = subprocess.run(
      [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "small"), str(tmp_path / "big")],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.loads(out.stdout.splitlines()[-1])
  assert record["peak"] - record["before"] < bound, record


# -- 2 processes as 1 ------------------------------------------------------------------------

def _tiny_images(root):
  """48 labelled 8x8 images (4 classes, class c brighter in channel c % 3) in an .npz."""
  rng = np.random.default_rng(0)
  labels = np.arange(48, dtype=np.int32) % 4
  images = rng.integers(0, 100, (48, 8, 8, 3)).astype(np.uint8)
  images[np.arange(48), :, :, labels % 3] += 120
  np.savez(root / "tiny.npz", images=images, labels=labels)
  return images, labels


def _launch_probe(config_file, workdir, processes: int, *flags):
  """launch/probe.py as `processes` processes of one job (2 CPU devices in all)."""
  from conftest import free_port  # pylint: disable=import-outside-toplevel
  port, procs = free_port(), []
  for i in range(processes):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={2 // processes}"}
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "launch.probe", f"--config={config_file}",
         f"--workdir={workdir}", *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


@pytest.mark.slow
def test_two_process_extraction_and_probe_equal_one_process(tmp_path):
  """Features bit for bit, the linear probes' table and the attentive probe's record equal."""
  _tiny_images(tmp_path)
  config_file = tmp_path / "probe_config.py"
  config_file.write_text(textwrap.dedent(f"""
      from experiments import probe_cifar10_tiny
      def get_config():
        c = probe_cifar10_tiny.get_config()
        c.data = dict(name={str(tmp_path / 'tiny.npz')!r}, train_split="train[:32]",
                      eval_split="train[32:]")
        c.batch_size, c.shard_batches, c.concat_k = 8, 2, 1
        c.l2s = (1e-2, 1e-1)
        c.low_data.sizes = ()
        c.attentive.update(k_layers=1, batch_size=8, epochs=2, weight_decays=(0.01, 0.1))
        return c
  """))
  results = {}
  for n in (1, 2):
    workdir = _checkpoint(tmp_path / f"p{n}")
    outs = _launch_probe(config_file, workdir, n)
    assert sum('"best_layer"' in o for o, _ in outs) == 1  # process 0 alone prints the summary
    results[n] = json.loads((workdir / "probe" / "results.json").read_text())
  feats = {n: probe.feature_sets(tmp_path / f"p{n}" / "probe") for n in (1, 2)}
  assert {s["process"] for s in probe.shards(feats[2][0], feats[2][1]["train"])} == {0, 1}
  for split in ("train", "test"):
    for name in ["labels"] + [f"layer{l:02d}" for l in range(CFG.n_layer + 1)]:
      one, two = (probe.load_feature(feats[n][0], feats[n][1][split], name) for n in (1, 2))
      assert one.tobytes() == two.tobytes(), (split, name)  # bit for bit
  assert results[1]["pretrained"] == results[2]["pretrained"]
  assert (results[1]["n_train"], results[1]["n_test"]) == (32, 16)
  # The attentive probe: the same batches on the same two devices, the same heads, bit for bit.
  per_process = {n: results[n]["attentive"].pop("memory_bytes_per_process") for n in (1, 2)}
  assert per_process[1] == 2 * per_process[2]  # each process holds its own shards' features
  assert results[1]["attentive"] == results[2]["attentive"]
  assert results[2]["attentive"]["layers"] == [results[2]["summary"]["best_layer"]]
  assert results[2]["attentive"]["n_test"] == 16 and len(results[2]["attentive"]["grid"]) == 4
  # The streaming probe on the same shards, data parallel over the two processes' devices.
  _launch_probe(config_file, tmp_path / "p2", 2, "--config.solver=sgd",
                "--config.sgd.batch_size=8", "--config.sgd.epochs=2")
  sgd = json.loads((tmp_path / "p2" / "probe" / "results.json").read_text())["pretrained"]
  assert {r["solver"] for r in sgd["layers"].values()} == {"sgd"}
  assert {r["n_fit"] + r["n_val"] for r in sgd["layers"].values()} == {32}


@pytest.mark.slow
def test_launch_probe_imagenet_config_on_an_image_folder(tmp_path):
  """`launch/probe.py --config experiments/probe_imagenet.py` with a local image-folder tree
  (train/ and validation/ of class folders) standing in for ImageNet: bfloat16 shards, SGD."""
  images, labels = _tiny_images(tmp_path)
  for i, (image, label) in enumerate(zip(images, labels)):
    split = "validation" if i >= 32 else "train"
    folder = tmp_path / "imagenet" / split / f"n{label:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{i:03d}.png")
  checkpoint_dir = _checkpoint(tmp_path / "run")
  outs = _launch_probe(REPO / "experiments" / "probe_imagenet.py", checkpoint_dir, 1,
                       f"--config.data.name={tmp_path / 'imagenet'}", "--config.batch_size=8",
                       "--config.sgd.batch_size=8", "--config.sgd.epochs=2",
                       "--config.mesh=(-1,1,1)")
  summary = json.loads(outs[0][0].splitlines()[-1])
  results = json.loads((checkpoint_dir / "probe" / "results.json").read_text())
  assert summary == results["summary"]
  assert {r["solver"] for r in results["pretrained"]["layers"].values()} == {"sgd"}
  assert (results["n_train"], results["n_test"]) == (32, 16)
  feat_dir, sets = probe.feature_sets(checkpoint_dir / "probe")
  assert all(s["dtype"] == "bfloat16" for s in probe.shards(feat_dir, sets["train"]))
