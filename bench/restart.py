"""Restart time: from process start to the first completed step, compilation cache off and warm.

  python -m bench.restart                       # the README demo (experiments/cifar10_tiny.py)
  python -m bench.restart --config experiments/igpt_s.py --set batch_size=2 \
      --set model.dtype=float32 --set data.shuffle_buffer=1000
                                                # iGPT-S (24 x 512, 32x32, scanned) on this CPU

A first run of the config trains from scratch with a fresh cache (config.compilation_cache) and
gets SIGTERM after its first step, so it saves at the next one and exits (a preemption). Each
restart then resumes a copy of that workdir and is timed to the first step it completes
(`first_step_s` in goodput.jsonl: from the process's start, through imports, devices, input,
restore and the train step's compile, to the step's results), then killed. The restarts
alternate, --reps of each: the cache off (`--config.compilation_cache=`) and warm (the first
run's). The JSON gives each restart's figure, their medians, and the parts of the time to the
first row (startup, restore, compile) from the rows' split. Data: the local CIFAR-10 file with
a random palette (the figures do not depend on either).
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import numpy as np

from bench import common
from experiments import base
from igpt_jax import goodput
from igpt_jax import palette as palette_lib

flags.DEFINE_string("config", "experiments/cifar10_tiny.py", "experiment config")
flags.DEFINE_multi_string("set", [], "more config overrides, field=value")
flags.DEFINE_integer("reps", 2, "restarts timed with the cache off, and as many warm")
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir: str, cache: str, palette: str) -> list[str]:
  args = [sys.executable, "-m", "launch.train", f"--config={FLAGS.config}",
          f"--workdir={workdir}", f"--config.compilation_cache={cache}",
          f"--config.palette={palette}", f"--config.data.name={base.LOCAL_CIFAR10}",
          "--config.data.train_split=train[:2000]", "--config.data.eval_split=train[2000:2100]",
          "--config.data.augment=none", "--config.total_steps=1000", "--config.log_every=1",
          "--config.checkpoint_every=1000", "--config.eval_every=1000"]
  return args + [f"--config.{kv}" for kv in FLAGS.set]


def _run_until_first_row(workdir: str, cache: str, palette: str, sig) -> dict:
  """Starts a run, waits for its first row after a (re)start, sends sig; -> that row."""
  seen = len(goodput.load(workdir)) if os.path.isdir(workdir) else 0
  log = f"{workdir}.log"
  with open(log, "w") as err:
    proc = subprocess.Popen(_command(workdir, cache, palette), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=err)
  try:
    while proc.poll() is None:
      procs = goodput.load(workdir) if os.path.isdir(workdir) else []
      if len(procs) > seen and procs[-1].rows:
        proc.send_signal(sig)
        proc.wait(timeout=600)
        return procs[-1].rows[0]
      time.sleep(0.2)
    with open(log) as f:
      raise RuntimeError(f"the run ended before its first row:\n{f.read()[-3000:]}")
  finally:
    if proc.poll() is None:
      proc.kill()


def main(argv):
  del argv
  if not os.path.exists(base.LOCAL_CIFAR10):
    raise SystemExit(f"needs the local CIFAR-10 file {base.LOCAL_CIFAR10}")
  load_before = common.load()
  root = tempfile.mkdtemp(prefix="bench_restart_")
  try:
    palette = os.path.join(root, "palette.npy")
    palette_lib.save_palette(palette, np.random.default_rng(0).uniform(-1, 1, (512, 3))
                             .astype(np.float32))
    cache, first = os.path.join(root, "cache"), os.path.join(root, "first")
    _run_until_first_row(first, cache, palette, signal.SIGTERM)  # saves at step 2, exits
    figures = {"off": [], "warm": []}
    parts = {"off": [], "warm": []}
    for i in range(FLAGS.reps):
      for mode in ("off", "warm"):
        workdir = os.path.join(root, f"{mode}{i}")
        shutil.copytree(first, workdir)
        row = _run_until_first_row(workdir, "" if mode == "off" else cache, palette,
                                   signal.SIGKILL)
        figures[mode].append(round(row["first_step_s"], 2))
        parts[mode].append({c: round(row["parts"][c], 2) for c in ("startup", "restore",
                                                                    "compile")})
    cached = sorted(os.listdir(cache))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  common.emit(dict(
      bench="restart", config=FLAGS.config, overrides=FLAGS.set, device=common.device_name(),
      reps=FLAGS.reps,
      first_step_s_cache_off=figures["off"], first_step_s_cache_warm=figures["warm"],
      median_first_step_s_cache_off=statistics.median(figures["off"]),
      median_first_step_s_cache_warm=statistics.median(figures["warm"]),
      first_row_parts_cache_off=parts["off"], first_row_parts_cache_warm=parts["warm"],
      cached_programs=len(cached), load_before=load_before, load_after=common.load()))


if __name__ == "__main__":
  app.run(main)
