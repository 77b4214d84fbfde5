"""Where the time goes: the ledger, step times, stragglers, goodput across restarts, MFU peaks,
profiles, the watchdog that ends a hung run, and the compilation cache."""

import gzip
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from igpt_jax import chips
from igpt_jax import console
from igpt_jax import faults
from igpt_jax import goodput
from igpt_jax import metrics as metrics_lib
from igpt_jax import train
from conftest import GCS_BUCKET, REPO, tiny_config


class FakeClock:
  """time.perf_counter and time.time as the test moves them."""

  def __init__(self, monkeypatch, start=1000.0):
    self.now = start
    monkeypatch.setattr(goodput.time, "perf_counter", lambda: self.now)
    monkeypatch.setattr(goodput.time, "time", lambda: self.now + 1e9)


def test_ledger_puts_every_second_in_one_category(monkeypatch):
  clock = FakeClock(monkeypatch)
  ledger = goodput.Ledger(started=clock.now + 1e9 - 5.0)  # the process started 5 s ago
  ledger.switch("host")
  clock.now += 1
  with ledger.phase("input"):
    clock.now += 2
  with ledger.phase("eval"):
    clock.now += 3
    with ledger.phase("compile"):  # nested: back in eval afterwards
      clock.now += 4
    clock.now += 5
  assert ledger.current == "host"
  clock.now += 0.5
  parts = ledger.interval()
  assert parts == dict(startup=5.0, restore=0.0, compile=4.0, input=2.0, step=0.0, host=1.5,
                       eval=8.0, checkpoint=0.0, profile=0.0)
  assert sum(parts.values()) == ledger.elapsed() == 20.5  # the parts are the wall time
  clock.now += 1
  assert ledger.interval()["host"] == 1.0  # only what came since
  assert ledger.left_excused == 1000.0 + 15  # the end of the eval phase


class Done:
  """A step's outputs that become ready when the test says so."""

  def __init__(self):
    self.ready = threading.Event()

  def block_until_ready(self):
    self.ready.wait(10)


def test_step_times_run_from_dispatch_or_the_previous_completion(monkeypatch, caplog):
  clock = FakeClock(monkeypatch)
  watch = goodput.StepWatch(straggler=5.0)
  outputs = {s: Done() for s in range(1, 15)}
  # Step 1 is dispatched at 0 and done at 2; step 2 was dispatched at 1 (queued behind it) and
  # is done at 3: 1 s of its own. Step 3 is dispatched at 10 (the host was busy): done at 11.
  clock.now = 0.0
  watch.dispatched(1, outputs[1])
  clock.now = 1.0
  watch.dispatched(2, outputs[2])
  clock.now = 2.0
  outputs[1].ready.set()
  assert watch.take(1) == [(1, 2.0)]
  clock.now = 3.0
  outputs[2].ready.set()
  assert watch.take(2) == [(2, 1.0)]
  clock.now = 10.0
  watch.dispatched(3, outputs[3])
  clock.now = 11.0
  outputs[3].ready.set()
  assert watch.take(3) == [(3, 1.0)] and watch.last_done == 11.0 and watch.first_done == 2.0
  for s in range(4, 14):  # ten more 1 s steps, then one of 10 s: a straggler
    watch.dispatched(s, outputs[s])
    clock.now += 10.0 if s == 13 else 1.0
    outputs[s].ready.set()
    watch.take(s)
  assert watch.median() == 1.0
  watch.close()
  stragglers = [r.getMessage() for r in caplog.records if "straggler" in r.getMessage()]
  assert stragglers == ["step 13 took 10.000 s, 10.0x the median 1.000 s of the last 12 steps: "
                        "a straggler"]


class Watched:
  def __init__(self, last_done=None, median=None):
    self.last_done, self._median = last_done, median

  def median(self):
    return self._median


def test_the_watchdog_allows_a_step_its_time_and_a_phase_its_own(monkeypatch):
  clock = FakeClock(monkeypatch)
  ledger = goodput.Ledger(started=clock.now + 1e9)
  deadline = lambda watch, timeout_s=0.0: goodput.hang_deadline(ledger, watch, timeout_s, 600.0)
  assert deadline(Watched())[0] == 1600.0  # startup: phase_s
  assert deadline(Watched(), timeout_s=-1) == (None, "")  # off
  clock.now = 1010.0
  ledger.switch("host")  # startup ends at 1010: the first step has phase_s from there
  assert deadline(Watched())[0] == 1610.0
  assert "first train step" in deadline(Watched())[1]
  # Steps complete: 100 x the median (2 s), at least 120 s, from the last completion.
  assert deadline(Watched(last_done=1020.0, median=2.0))[0] == 1220.0
  assert deadline(Watched(last_done=1020.0, median=0.01))[0] == 1140.0
  assert deadline(Watched(last_done=1020.0, median=0.01), timeout_s=3)[0] == 1023.0
  clock.now = 1030.0
  with ledger.phase("eval"):  # a long evaluation is no hang until phase_s
    assert deadline(Watched(last_done=1020.0, median=0.01), timeout_s=3)[0] == 1630.0
    clock.now = 1100.0
  # After it, the step clock starts again from the evaluation's end.
  assert deadline(Watched(last_done=1020.0, median=0.01), timeout_s=3)[0] == 1103.0


def rows(*specs):
  """goodput.jsonl records: ("start", started, step) / ("row" | "end", time, step, step_s,
  other_s)."""
  out = []
  for kind, t, step, *parts in specs:
    if kind == "start":
      out.append(dict(event="start", time=t, started=t, step=step))
    else:
      out.append(dict(event=kind, time=t, step=step,
                      parts=dict(step=parts[0], host=parts[1]),
                      step_times=[[step, parts[0]]] if kind == "row" else []))
  return out


def test_goodput_counts_steps_trained_again_as_lost_and_the_gap_as_down():
  records = rows(
      # Process 0: 10 s to its row at step 10 (8 s of steps), its row at 20 (10 s of steps),
      # then it died; a checkpoint at step 15 survived.
      ("start", 0.0, 0), ("row", 10.0, 10, 8.0, 2.0), ("row", 20.0, 20, 10.0, 0.0),
      # Process 1 starts at 30 from step 15 and ends at 50.
      ("start", 30.0, 15), ("row", 45.0, 25, 12.0, 3.0), ("end", 50.0, 25, 0.0, 5.0))
  procs = goodput.processes(records)
  summary = goodput.summarize(procs)
  assert summary["wall_s"] == 50.0
  # Steps 16-20 (half of process 0's second row) are trained again: 5 s lost.
  assert summary["badput_s"]["lost"] == 5.0
  assert summary["badput_s"]["down"] == 10.0  # from its last row at 20 to the restart at 30
  assert summary["productive_s"] == 8.0 + 10.0 - 5.0 + 12.0
  assert summary["goodput"] == round(25.0 / 50.0, 4)
  assert summary["unaccounted_s"] == 0.0  # every second of the wall time has a cause
  assert [p["lost_steps"] for p in summary["processes"]] == [5, 0]
  assert summary["steps"]["worst"][0] == [25, 12.0]
  # The live figure of process 1 at its start: process 0's steps that count, from its start.
  assert goodput.job_so_far(goodput.processes(records[:3]), 30.0, 15) == (0.0, 13.0)
  assert goodput.job_so_far([], 30.0, 0) == (30.0, 0.0)
  # A process that died before its first row: its whole life is down time.
  records[3:3] = rows(("start", 22.0, 15))
  summary = goodput.summarize(goodput.processes(records))
  assert summary["badput_s"]["down"] == 10.0 and summary["unaccounted_s"] == 0.0
  assert [p["wall_s"] for p in summary["processes"]] == [20.0, 0.0, 20.0]


def test_summary_command_prints_and_draws(tmp_path):
  for record in rows(("start", 0.0, 0), ("row", 10.0, 10, 8.0, 2.0), ("end", 11.0, 10, 0, 1)):
    metrics_lib.append_jsonl(tmp_path / goodput.FILE, record, fresh=False)
  done = subprocess.run([sys.executable, "-m", "launch.goodput", f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, check=True)
  out = done.stdout
  assert "absl::InitializeLog" not in done.stderr  # set up before jax imports, as every script
  summary = json.loads(out.splitlines()[-1])
  assert summary["goodput"] == round(8 / 11, 4) and summary["badput_s"]["host"] == 3.0
  assert "goodput 72.7%" in out
  assert (tmp_path / "goodput.png").read_bytes()[:4] == b"\x89PNG"


def test_peaks_come_from_the_table_the_config_or_a_measurement():
  kind = lambda k: type("Device", (), {"device_kind": k})()
  assert chips.find("TPU v5 lite")[0] == "v5e" and chips.find("TPU v5")[0] == "v5p"
  assert chips.find("TPU v5p")[0] == "v5p" and chips.find("TPU v6 lite")[0] == "v6e"
  assert chips.find("NVIDIA H100 80GB HBM3")[0] == "h100" and chips.find("cpu") is None
  assert chips.peak_flops(0, kind("TPU v4"), "bfloat16")[0] == 275e12
  assert chips.peak_flops(0, kind("NVIDIA A100-SXM4-80GB"), "float32")[0] == 156e12
  assert chips.peak_flops(0, kind("cpu"), "float32")[0] is None
  assert chips.peak_flops(2e12, kind("cpu"), "float32") == (2e12, "config.peak_flops")
  assert chips.peak_flops(-1, jax.devices()[0], "float32")[0] > 1e8  # a matmul, measured


# -- runs ------------------------------------------------------------------------------------


def xplane_files(workdir):
  return [p for p in pathlib.Path(workdir).glob("plugins/profile/*/*.xplane.pb")]


@pytest.mark.slow
def test_a_profile_of_chosen_steps_lands_in_the_workdir_with_the_train_step(files, tmp_path):
  config = tiny_config(files, total_steps=26, log_every=5, eval_every=0, checkpoint_every=0,
                       peak_flops=1e12)
  config.profile.update(start_step=20, steps=5)
  train.train_and_evaluate(config, str(tmp_path))
  [trace] = xplane_files(tmp_path)
  assert b"jit_train_step" in trace.read_bytes()
  perfetto = trace.parent / "perfetto_trace.json.gz"
  assert b"jit_train_step" in gzip.decompress(perfetto.read_bytes())
  rows_ = metrics_lib.read(tmp_path)
  parts = [k for k in rows_[25] if k.startswith("time_")]
  assert len(parts) == len(goodput.CATEGORIES)
  assert rows_[25]["time_profile_s"] > 0  # the trace's start and write are counted apart
  # With a given peak, MFU is the TFLOP/s per device over it.
  assert rows_[25]["mfu"] == pytest.approx(rows_[25]["tflops_per_device"] / 1.0)


@pytest.mark.slow
def test_a_profile_in_a_bucket(files, gcs, tmp_path):
  del gcs
  workdir = f"gs://{GCS_BUCKET}/profiled"
  config = tiny_config(files, total_steps=22, log_every=11, eval_every=0, checkpoint_every=0)
  config.profile.update(start_step=20, steps=5)  # past the end: cut at the last step
  train.train_and_evaluate(config, workdir)
  from igpt_jax import paths  # pylint: disable=import-outside-toplevel
  traces = list(paths.path(workdir).glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and b"jit_train_step" in traces[0].read_bytes()
  assert goodput.summarize(goodput.load(workdir))["processes"][0]["last_step"] == 22


HANGING_INPUT = """
import sys, threading
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from igpt_jax import data, train
make = data.make_dataset

def hanging(*args, train=False, **kwargs):
  batches = make(*args, train=train, **kwargs)
  for i, batch in enumerate(batches):
    if train and i == 11:  # the batch of step 12 never comes
      threading.Event().wait()
    yield batch

data.make_dataset = hanging
config = tiny_config(({data!r}, {palette!r}), total_steps=30, log_every=1, eval_every=0,
                     checkpoint_every=5)
config.watchdog.timeout_s = 3.0
train.run(config, {workdir!r})
"""


@pytest.mark.slow
def test_a_hung_step_ends_the_run_with_the_stacks_and_one_line(files, tmp_path):
  script = HANGING_INPUT.format(tests=str(REPO / "tests"), data=str(files[0]),
                                palette=str(files[1]), workdir=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  ended = time.time()
  assert proc.returncode == faults.HUNG == 124, proc.stderr[-3000:]
  err = proc.stderr
  # Every thread's stack, the loop's blocked in the input, then the line.
  assert "the run is hung (no train step completed for watchdog.timeout_s (3 s)); the stacks" in err
  assert err.count("(most recent call first)") >= 3  # the loop, the step watch, the watchdog
  assert "in hanging" in err  # where the loop is stuck
  last = err.strip().splitlines()[-1]
  assert ("hung: no train step completed for watchdog.timeout_s (3 s): step 12 did not complete "
          "(the last completed step is 11; the loop was in input); newest checkpoint step 10: "
          "exiting with status 124") in last
  # Within the configured time: from the row of step 11 to the exit, 3 s and the 1 s poll.
  row = [r for r in metrics_lib.read_jsonl(tmp_path / goodput.FILE) if r["event"] == "row"][-1]
  assert row["step"] == 11
  assert 2.5 <= ended - row["time"] < 3.0 + 6.0


@pytest.mark.slow
def test_a_restart_loads_its_programs_from_the_compilation_cache(files, tmp_path, monkeypatch):
  monkeypatch.setattr(console, "CACHE_MIN_COMPILE_S", 0.0)  # however fast the machine compiles
  hits = []
  jax.monitoring.register_event_listener(
      lambda event, **_: hits.append(event) if event.endswith("cache_hits") else None)
  # A constant schedule: the restart's step is the first run's program though it goes further.
  config = tiny_config(files, total_steps=6, eval_every=0, checkpoint_every=3, sample_every=0,
                       schedule="constant")
  suites = jax.config.jax_compilation_cache_dir  # conftest's, given back afterwards
  try:
    console.compilation_cache(str(tmp_path / "cache"))
    train.train_and_evaluate(config, str(tmp_path / "run"))
    assert any(f.startswith("jit_train_step") for f in os.listdir(tmp_path / "cache"))
    assert not hits
    config.total_steps = 9  # the restart
    train.train_and_evaluate(config, str(tmp_path / "run"))
  finally:
    console.compilation_cache(suites or "")
  assert hits


def test_importing_the_library_leaves_the_compilation_cache_alone():
  code = ("import jax, igpt_jax.train, igpt_jax.goodput, igpt_jax.profiler, igpt_jax.chips; "
          "print(jax.config.jax_compilation_cache_dir)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True, env={k: v for k, v in os.environ.items()
                                        if k != "JAX_COMPILATION_CACHE_DIR"}).stdout
  assert out.strip() == "None"
  assert np.isfinite(goodput.process_start())
