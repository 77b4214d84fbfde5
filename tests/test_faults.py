"""The faults a long run meets: a failed save, unreadable image files, a lost process.

Each ends in one line that names what happened, a documented exit status, and nothing lost:
docs/faults.md.
"""

import errno
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from igpt_jax import checkpoint
from igpt_jax import console
from igpt_jax import data
from igpt_jax import faults
from igpt_jax import metrics as metrics_lib
from igpt_jax import paths
from igpt_jax import train
from conftest import (GCS_BUCKET, REPO, TINY, free_port, run_pair, save_train_states,
                      tiny_config)

# pylint: disable=redefined-outer-name,protected-access

pytest.importorskip("tensorflow")


def launch(files, workdir, steps, *, limit=None, env=None, **extra):
  """launch/train.py on the tiny config; limit: RLIMIT_FSIZE bytes for the process."""
  args = [sys.executable, "-m", "launch.train", f"--config={TINY}", f"--workdir={workdir}",
          f"--config.data.name={files[0]}", f"--config.palette={files[1]}",
          f"--config.total_steps={steps}", "--config.eval_every=0", "--config.log_every=1",
          *[f"--config.{k}={v}" for k, v in extra.items()]]
  limit_size = None if limit is None else (
      lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, preexec_fn=limit_size)


def finish(proc, timeout=600):
  """-> (exit status, stderr lines)."""
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err.splitlines()


# -- a failed save ----------------------------------------------------------------------------

# One tiny checkpoint takes about 0.54 MB of a tmpfs (its files rounded to pages) and the run's
# other files about 80 kB: 620 kB after the first run, whose save needs room beyond that while
# it writes (at 800k it failed once in a CI run on 2 workers). A 1 MB filesystem holds the first
# run, not a second checkpoint. Without a filesystem the test may mount, a file-size limit makes
# every checkpoint write fail for real (EFBIG) while the run's small files (metrics.jsonl,
# events, orbax's metadata) stay under it.
SMALL_FS = "1m"
FILE_LIMIT = 32_000


@pytest.fixture
def storage(tmp_path):
  """Where a run's saves fail: {"workdir", "limit" (for the failing run), "free" (after it)}."""
  small = tmp_path / "small"
  small.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "tmpfs", str(small)],
                         capture_output=True, check=False)
  if mount.returncode == 0:
    grow = ["mount", "-o", "remount,size=16m", str(small)]
    yield types.SimpleNamespace(kind="full filesystem", workdir=small / "run", limit=None,
                                free=lambda: subprocess.run(grow, check=True))
    subprocess.run(["umount", str(small)], check=False)
  else:
    yield types.SimpleNamespace(kind="file-size limit", workdir=tmp_path / "run",
                                limit=FILE_LIMIT, free=lambda: None)


@pytest.mark.slow
def test_failed_save_is_one_line_and_a_rerun_resumes(files, tmp_path, storage):
  steps = dict(checkpoint_every=10, schedule="constant")  # one cosine would differ by total
  # Step 10 is saved; the run that goes on fails to save step 20 and stops.
  status, _ = finish(launch(files, storage.workdir, 10, **steps))
  assert status == 0
  status, err = finish(launch(files, storage.workdir, 30, limit=storage.limit, **steps))
  after_start = err[next(i for i, line in enumerate(err) if "resumed from step 10" in line):]
  errors = [line for line in after_start if "was not saved" in line]
  assert status == faults.SAVE_FAILED, (storage.kind, err[-30:])
  assert len(errors) == 1, after_start
  # The disk fills while the step's files are written or as they are committed, by its size.
  assert re.search(r"checkpoint step 20 was not saved: (no space left on device|file too large)"
                   r" \(.*/checkpoints/20[^)]*\); removed its partial files; the "
                   r"newest good checkpoint is step 10 in ", errors[0]), errors[0]
  noise = [line for line in after_start if re.search(
      r"Traceback|Exception ignored|Event loop is closed|Fatal", line)]
  assert not noise, noise
  assert os.listdir(storage.workdir / "checkpoints") == ["10"]  # the partial step is gone
  assert checkpoint.read_meta(str(storage.workdir))["step"] == 10

  storage.free()
  status, err = finish(launch(files, storage.workdir, 30, **steps))
  assert status == 0 and any("resumed from step 10" in line for line in err), err[-20:]
  status, _ = finish(launch(files, tmp_path / "whole", 30, **steps))
  assert status == 0
  want, got = metrics_lib.read(tmp_path / "whole"), metrics_lib.read(storage.workdir)
  np.testing.assert_allclose([got[s]["train_loss"] for s in range(11, 31)],
                             [want[s]["train_loss"] for s in range(11, 31)], rtol=0, atol=1e-6)


@pytest.mark.parametrize("error, cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 3936256 bytes to file '
                "8: No space left on device [os_error_code='28']"), "no space left on device"),
    (ValueError("PERMISSION_DENIED: HTTP response code: 403 ..."), "permission denied"),
    (ValueError("RESOURCE_EXHAUSTED: HTTP response code: 429 with body: rateLimitExceeded"),
     "storage quota exceeded"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
])
def test_save_failures_are_named_by_cause(error, cause):
  try:
    try:
      raise error
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError("Save Finalize thread failed") from e  # how orbax may wrap it
  except RuntimeError as wrapped:
    assert checkpoint._save_cause(wrapped) == cause
  assert checkpoint._save_cause(ValueError("shapes differ")) is None


def test_abandoned_orbax_writes_are_quiet_and_nothing_else(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  console._quiet_abandoned_writes()  # console.setup's, once per launch
  for e in (RuntimeError("Event loop is closed"), RuntimeError("another"), ValueError("x")):
    sys.unraisablehook(types.SimpleNamespace(exc_value=e, exc_type=type(e), object=None))
  assert [str(e) for e in seen] == ["another", "x"]
  asyncio_log = logging.getLogger("asyncio")
  record = lambda msg: asyncio_log.makeRecord("asyncio", logging.ERROR, "f", 1, msg, (), None)
  assert not asyncio_log.filter(record(
      "Task exception was never retrieved\nfuture: <Task finished coro=<async_serialize() done, "
      "defined at /venv/orbax/checkpoint/_src/serialization.py:126>"))
  assert asyncio_log.filter(record("Task exception was never retrieved\nfuture: <Task mine>"))


# -- unreadable image files -------------------------------------------------------------------

PALETTE = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)


@pytest.fixture
def folder(tmp_path, cifar10_sample):
  """An image folder of 16 real PNGs (class = index % 2) and one truncated, one empty file."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root = tmp_path / "folder"
  for i, image in enumerate(cifar10_sample[0][:16]):
    os.makedirs(root / f"c{i % 2}", exist_ok=True)
    Image.fromarray(image).save(root / f"c{i % 2}" / f"{i:02d}.png")
  raw = (root / "c0" / "04.png").read_bytes()
  (root / "c0" / "04.png").write_bytes(raw[:len(raw) // 2])
  (root / "c1" / "07.png").write_bytes(b"")
  return root


def stream(root, **kw):
  kw = {"split": "train", "batch_size": 4, "n_px": 4, "train": True, "seed": 3, **kw}
  return data.make_dataset({"name": str(root), "shuffle_buffer": 16}, palette=PALETTE, **kw)


def test_bad_image_files_are_skipped_named_and_resumable(folder, caplog):
  with caplog.at_level("WARNING"):
    it = stream(folder)
    batches = [next(it) for _ in range(8)]  # two epochs of the 16 files
  warnings = [r.getMessage() for r in caplog.records if "skipping image" in r.getMessage()]
  assert len(warnings) == 2, warnings  # one per file, though both epochs meet both
  assert any(re.search(r"c0/04\.png: not a decodable image \(\d+ bytes; .*truncated", w)
             for w in warnings), warnings
  assert any("c1/07.png: empty file (0 bytes)" in w for w in warnings), warnings
  # Every row is one of the 14 good images (a bad file's slot holds a copy of another one).
  good = {row.tobytes() for b in stream(folder, train=False) for row in b["tokens"][b["valid"]]}
  assert len(good) == 14
  assert all(len(b["tokens"]) == 4 and {r.tobytes() for r in b["tokens"]} <= good
             for b in batches)
  # The order is a function of (seed, position): a resume at batch 5 sees batches 5, 6, 7.
  resumed = stream(folder, start_step=5)
  for k in (5, 6, 7):
    got = next(resumed)
    for key in ("tokens", "labels"):
      np.testing.assert_array_equal(got[key], batches[k][key])
  assert len(data.load_images({"name": str(folder)}, "train")[0]) == 14


def test_bad_image_file_is_an_error_naming_it_without_skip(folder):
  cfg = {"name": str(folder), "skip_bad_files": False}
  with pytest.raises(ValueError, match=r"c0/04\.png: not a decodable image .*truncated.*"
                                       r"skip_bad_files=True"):
    list(data.make_dataset(cfg, split="train", batch_size=4, palette=PALETTE, n_px=4,
                           train=False))
  with pytest.raises(ValueError, match=r"(c0/04\.png|c1/07\.png): .*skip_bad_files"):
    data.load_images(cfg, "train")


def test_a_truncated_jpeg_is_skipped_where_its_window_is_decoded(tmp_path, cifar10_sample,
                                                                 caplog):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  root = tmp_path / "jpegs"
  for i, image in enumerate(cifar10_sample[0][:8]):
    os.makedirs(root / f"c{i % 2}", exist_ok=True)
    Image.fromarray(image).resize((64, 48)).save(root / f"c{i % 2}" / f"{i}.jpg")
  raw = (root / "c1" / "3.jpg").read_bytes()
  (root / "c1" / "3.jpg").write_bytes(raw[:len(raw) // 4])  # its header whole, its scan cut
  with caplog.at_level("WARNING"):
    batches = [next(it) for it in [stream(root)] for _ in range(6)]  # three epochs
  warnings = [r.getMessage() for r in caplog.records if "skipping image" in r.getMessage()]
  assert len(warnings) == 1 and re.search(r"(?i)c1/3\.jpg: not a decodable image .*truncated",
                                          warnings[0]), warnings
  good = {row.tobytes() for b in stream(root, train=False) for row in b["tokens"][b["valid"]]}
  assert len(good) == 7
  assert all({r.tobytes() for r in b["tokens"]} <= good for b in batches)
  for k, got in zip((4, 5), [next(it) for it in [stream(root, start_step=4)] for _ in range(2)]):
    np.testing.assert_array_equal(got["tokens"], batches[k]["tokens"])


@pytest.mark.slow
def test_skipped_files_are_counted_in_metrics(folder, tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_BAD_FILES", {})  # this run's count only
  monkeypatch.setattr(data, "_BAD_MET", [])
  from igpt_jax import palette as palette_lib  # pylint: disable=import-outside-toplevel
  palette_lib.save_palette(tmp_path / "palette.npy", PALETTE)
  config = tiny_config((folder, tmp_path / "palette.npy"), total_steps=2, checkpoint_every=0)
  config.data.train_split, config.data.eval_split = "train", "train"
  train.train_and_evaluate(config, str(tmp_path / "w"))
  metrics = metrics_lib.read(tmp_path / "w")
  assert metrics[2]["data_skipped_files"] == 2  # both met by then (batches of 8 of 16 files)


@pytest.mark.parametrize("write, message", [
    (lambda p: np.savez(p, images=np.zeros((4, 8, 8, 3), np.float32), labels=np.zeros(4)),
     r"bad\.npz: images must be uint8 \[N, H, W, 3\], got float32 \(4, 8, 8, 3\)"),
    (lambda p: np.savez(p, images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4)),
     r"bad\.npz: images must be uint8 \[N, H, W, 3\], got uint8 \(4, 8, 8\)"),
    (lambda p: p.write_bytes(b"PK\x03\x04 cut short"),
     r"bad\.npz: not a readable \.npz of `images` uint8 \[N, H, W, 3\] and `labels` int \[N\]"),
])
def test_bad_npz_is_named_with_the_expected_layout(tmp_path, write, message):
  write(tmp_path / "bad.npz")
  with pytest.raises(ValueError, match=message):
    data.load_images({"name": str(tmp_path / "bad.npz")}, "train")


# -- a lost process ---------------------------------------------------------------------------

LOST_WITHIN_S = 30  # measured: about 5 s (the roll call), faults.SILENT_S (20 s) + 1 in a barrier


def launch_pair(files, workdir, steps):
  port, procs = free_port(), []
  for i in range(2):
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs.append(launch(files, workdir, steps, env=env, checkpoint_every=4))
  return procs


@pytest.mark.slow
def test_lost_process_ends_the_survivor_promptly_and_the_restart_resumes(files, tmp_path):
  procs = launch_pair(files, tmp_path, 5000)
  # Killed once a checkpoint has committed (on 2 loaded cores the first save can still be in
  # flight at step 8), so that the restart has one to resume from.
  metrics, killed = tmp_path / "metrics.jsonl", None
  while all(p.poll() is None for p in procs):
    if (metrics.exists() and max(metrics_lib.read(tmp_path), default=0) >= 8
        and checkpoint.newest_good_step(tmp_path / "checkpoints") is not None):
      procs[1].send_signal(signal.SIGKILL)
      killed = time.monotonic()
      break
    time.sleep(0.05)
  assert killed is not None, "the job ended before step 8 and a checkpoint"
  status, err = finish(procs[0], timeout=LOST_WITHIN_S + 60)
  took = time.monotonic() - killed
  procs[1].wait()
  lines = [line for line in err if "lost process" in line]
  assert status == faults.PEER_LOST, err[-30:]
  assert took < LOST_WITHIN_S, took
  newest = checkpoint.newest_good_step(tmp_path / "checkpoints")
  # A collective fails (the usual case), or the kill finds the survivor in a call that waits
  # for process 1 without failing (orbax's barrier around the save of step 8): then its pulse.
  found = len(lines) == 1 and re.search(
      rf"lost process 1 of 2 \((a collective failed: .*|silent for \d+ s)\); this is process 0, "
      rf"last completed step (\d+), newest checkpoint step {newest}: restart", lines[0])
  assert found and int(found.group(2)) >= 8, lines  # the loop's step
  assert not [line for line in err if re.search(r"Fatal|Traceback|Check failure", line)]

  procs = launch_pair(files, tmp_path, newest + 4)
  for p in procs:
    status, err = finish(p)
    assert status == 0 and any(f"resumed from step {newest}" in line for line in err), err[-20:]
  assert checkpoint.newest_good_step(tmp_path / "checkpoints") == newest + 4


def test_a_process_whose_pulse_stops_is_lost_after_the_silence(monkeypatch):
  monkeypatch.setattr(faults, "SILENT_S", 10.0)
  silence = faults.Silence(3, now=100.0)
  beats = lambda n0, n1, n2: [("igpt_pulse/0", str(n0)), ("igpt_pulse/1", str(n1)),
                              ("igpt_pulse/2", str(n2))]
  assert silence.hear(beats(1, 1, 1), 101.0) == []
  assert silence.hear(beats(5, 1, 5), 105.0) == []
  assert silence.hear(beats(11, 1, 11), 111.0) == []  # process 1 unmoved for 10 s: not yet
  assert silence.hear(beats(12, 1, 12), 111.5) == [1]
  assert silence.hear(beats(13, 2, 13), 112.0) == []  # it spoke again


def test_a_process_never_heard_counts_from_the_first_reading(monkeypatch):
  monkeypatch.setattr(faults, "SILENT_S", 10.0)
  silence = faults.Silence(2, now=100.0)
  assert silence.hear([("igpt_pulse/0", "1")], 109.0) == []
  assert silence.hear([("igpt_pulse/0", "2")], 110.5) == [1]


def test_an_unanswering_coordination_service_means_its_host_is_lost(monkeypatch):
  monkeypatch.setattr(faults, "SILENT_S", 10.0)
  silence = faults.Silence(4, now=100.0)
  assert silence.hear(None, 105.0) == []
  assert silence.hear([(f"igpt_pulse/{p}", "1") for p in range(4)], 106.0) == []
  assert silence.hear(None, 115.0) == []  # 9 s since it answered
  assert silence.hear(None, 116.5) == [0]


@pytest.mark.slow
def test_a_survivor_waiting_in_a_barrier_for_a_vanished_process_exits_lost():
  # Before the pulse: jax aborted it (SIGABRT) at its heartbeat timeout, 100 s here.
  port, procs = free_port(), []
  for i in range(2):
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu"}
    procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "pair_process.py"),
                                   "silent", "unused"], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  assert procs[1].wait(timeout=120) == 0
  started = time.monotonic()
  status, err = finish(procs[0], timeout=60)
  assert status == faults.PEER_LOST, err[-20:]
  assert time.monotonic() - started < 20
  assert [line for line in err if re.search(
      r"lost process 1 of 2 \(silent for 4 s\); this is process 0, last completed step 7, "
      r"newest checkpoint none: restart the job", line)], err[-20:]


# -- a checkpoint that one process cannot read, or the storage failing for a while ---------------


@pytest.fixture(params=["local", "bucket"])
def two_steps(request, tmp_path):
  """A workdir (local, or in the GCS emulator's bucket) with checkpoints 3 and 6 of a train
  state; -> (workdir, {step: sum of wte})."""
  workdir = tmp_path
  if request.param == "bucket":
    request.getfixturevalue("gcs")
    workdir = paths.path(f"gs://{GCS_BUCKET}/{tmp_path.name}")
  return workdir, save_train_states(workdir, [3, 6])


def restored(outs, sums) -> int:
  """The step both processes restored (the same one, with that step's parameters)."""
  assert all("step" in o for o in outs), outs
  assert outs[0]["step"] == outs[1]["step"], outs
  step = outs[0]["step"]
  assert sum(o["wte_sum"] for o in outs) == pytest.approx(sums[step], rel=1e-6)  # two halves
  return step


@pytest.mark.slow
def test_newest_unreadable_on_one_process_only_both_restore_the_older_one(two_steps):
  workdir, sums = two_steps
  outs = run_pair("restore", workdir, "--unreadable_on=1", "--unreadable_step=6")
  assert restored(outs, sums) == 3
  assert all(o["set_aside"] == ["6"] and o["steps"] == [3] for o in outs), outs  # moved once
  assert [p.name for p in (workdir / "unreadable_checkpoints").iterdir()] == ["6"]


@pytest.mark.slow
def test_storage_failing_for_a_while_during_restore_is_retried_nothing_set_aside(two_steps):
  workdir, sums = two_steps
  outs = run_pair("restore", workdir, "--transient_on=0", "--transient_step=6",
                  "--transient_times=2")
  assert restored(outs, sums) == 6
  assert all(o["set_aside"] == [] and o["steps"] == [3, 6] for o in outs), outs
