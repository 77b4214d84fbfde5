"""Where a run's time goes, as it runs and afterwards, across the restarts of one workdir.

  process_start() -> unix time this process started
  Ledger(started)                   every second of this process in one category (CATEGORIES)
  StepWatch(straggler)              a thread that sees each dispatched train step complete
  hang_deadline(ledger, watch, timeout_s, phase_s) -> (deadline, what): the watchdog's rule
  Record(workdir, active)           workdir/goodput.jsonl: each process's start, rows and end
  load(workdir) -> [Process]; summarize(processes) -> dict; plot(processes, summary, path)

The split. The loop's main thread is in exactly one category at any moment (`Ledger.phase`), so
the parts of every interval add up to its wall time:
  startup     from the process's start to the loop: imports, devices, palette, input, init
  restore     reading the newest checkpoint
  compile     the train step's first call (trace and compile; its execution is asynchronous)
  input       blocked in next() on the training input
  step        dispatching train steps, and blocked where the loop waits for their results
              (the host sync before each row or save, `train._Pending.fetch`; a profiled
              window's end): with asynchronous dispatch, the time the host waited on the chips
  host        the loop's own work between steps: polling saves, rows, metrics writes
  eval        the evaluators (held-out loss, samples, probes), their compiles included
  checkpoint  starting saves (the copy off the devices) and waiting for them
  profile     starting and writing profiler traces
A compute-bound run spends its interval in `step`; an input-bound one in `input`.

Goodput is the `step` time of the steps that count over the job's wall time since its first
process started. The job is every process that ran in the workdir: the steps a process trained
after the checkpoint the next process resumed from are trained again, so their step time is
badput `lost`; the time from a process's last record to the next one's start (what it did after
its last row before it died, and the wait for the restart) is `down`.

Step times come from `StepWatch`, which blocks on each step's outputs in its own thread: a
step's time runs from its dispatch, or the previous step's completion if later, to its
completion (the chips' time for it, whatever the host did meanwhile).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import queue
import statistics
import threading
import time

import jax

from igpt_jax import metrics as metrics_lib
from igpt_jax import paths

FILE = "goodput.jsonl"
CATEGORIES = ("startup", "restore", "compile", "input", "step", "host", "eval", "checkpoint",
              "profile")
TRAINING = ("input", "step", "host")  # the steady loop: what steps/s and MFU are measured over
# Phases whose length has nothing to do with a step's: the watchdog gives them phase_s.
EXCUSED = ("startup", "restore", "compile", "eval", "checkpoint", "profile")
# The watchdog's automatic timeout (config.watchdog.timeout_s = 0): no step completed for this
# many median steps, and never less than AUTO_MIN_S.
AUTO_FACTOR = 100
AUTO_MIN_S = 120.0
STRAGGLER_MIN_STEPS = 10  # steps timed before one is judged against their median
_IMPORTED = time.time()


def process_start() -> float:
  """Unix time this process started (Linux: its age from /proc, to 10 ms; elsewhere the time
  igpt_jax.goodput was first imported)."""
  try:
    with open("/proc/self/stat") as f:
      ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start, since boot
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return _IMPORTED


class Ledger:
  """This process's wall time by category: `with ledger.phase(c):` is in c, then back in the
  category it left. It starts in "startup" at `started` (unix time)."""

  def __init__(self, started: float):
    now = time.perf_counter()
    self.origin = now - max(0.0, time.time() - started)  # `started` on the perf_counter clock
    self.totals = dict.fromkeys(CATEGORIES, 0.0)
    self._taken = dict(self.totals)
    self.current, self.since = "startup", self.origin
    self.left_excused = self.origin  # when the loop last left an excused phase

  def switch(self, category: str) -> None:
    now = time.perf_counter()
    self.totals[self.current] += now - self.since
    if self.current in EXCUSED and category not in EXCUSED:
      self.left_excused = now
    self.current, self.since = category, now

  @contextlib.contextmanager
  def phase(self, category: str):
    previous = self.current
    self.switch(category)
    try:
      yield
    finally:
      self.switch(previous)

  def interval(self) -> dict[str, float]:
    """{category: seconds} since the previous call (the first: since the process started)."""
    self.switch(self.current)
    parts = {c: self.totals[c] - self._taken[c] for c in CATEGORIES}
    self._taken = dict(self.totals)
    return parts

  def elapsed(self, t: float | None = None) -> float:
    """Seconds from the process's start to perf_counter time t (default now)."""
    return (time.perf_counter() if t is None else t) - self.origin


class StepWatch:
  """Blocks on each dispatched step's outputs in a thread, timing the steps as they complete;
  logs a step over `straggler` x the median of the last `window` as a straggler (0: never)."""

  def __init__(self, straggler: float = 0.0, window: int = 100):
    self.straggler = straggler
    self._queue = queue.SimpleQueue()
    self._done = threading.Condition()
    self._times: list[tuple[int, float]] = []  # (step, seconds) since the last take()
    self._recent = collections.deque(maxlen=window)
    self.last_step: int | None = None
    self.last_done: float | None = None  # perf_counter time of the last completion
    self.first_done: float | None = None
    self._thread = threading.Thread(target=self._run, name="igpt-step-watch", daemon=True)
    self._thread.start()

  def dispatched(self, step: int, outputs) -> None:
    """After step's call returned: outputs are its results on the devices (small ones)."""
    self._queue.put((step, time.perf_counter(), outputs))

  def _run(self) -> None:
    while (item := self._queue.get()) is not None:
      step, dispatched, outputs = item
      try:
        jax.block_until_ready(outputs)
      except Exception:  # pylint: disable=broad-except  # the loop meets it at its own sync
        return
      done = time.perf_counter()
      seconds = done - max(dispatched, self.last_done or dispatched)
      median = self.median()
      with self._done:
        self._times.append((step, seconds))
        self._recent.append(seconds)
        self.last_step, self.last_done = step, done
        self.first_done = self.first_done or done
        self._done.notify_all()
      if (self.straggler > 0 and median and len(self._recent) > STRAGGLER_MIN_STEPS
          and seconds > self.straggler * median):
        logging.warning("step %d took %.3f s, %.1fx the median %.3f s of the last %d steps: a "
                        "straggler", step, seconds, seconds / median, median,
                        len(self._recent) - 1)

  def median(self) -> float | None:
    recent = list(self._recent)
    return statistics.median(recent) if recent else None

  def take(self, through: int, timeout_s: float = 30.0) -> list[tuple[int, float]]:
    """The (step, seconds) timed since the last take, once step `through` is (the loop has
    just fetched its results, so that is at once)."""
    with self._done:
      self._done.wait_for(lambda: (self.last_step or 0) >= through, timeout_s)
      times, self._times = self._times, []
    return times

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join(timeout=1.0)  # a step that never completes keeps it: a daemon thread

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def hang_deadline(ledger: Ledger, watch: StepWatch, timeout_s: float,
                  phase_s: float) -> tuple[float | None, str]:
  """When the run counts as hung (perf_counter time, or None: never), and what it waits for.

  In an excused phase (a compile, an evaluation, a save, ...): phase_s after it began. Else no
  train step may go timeout_s without completing (0: max(AUTO_MIN_S, AUTO_FACTOR x the median
  step)), counted from the later of the last completion and the end of the last excused phase;
  until this process's first step completes, that step has phase_s (it may still compile)."""
  if timeout_s < 0:
    return None, ""
  if ledger.current in EXCUSED:
    return ledger.since + phase_s, (f"the {ledger.current} phase ran past watchdog.phase_s "
                                    f"({phase_s:g} s)")
  since = max(ledger.left_excused, watch.last_done or ledger.left_excused)
  if watch.last_done is None:
    return since + phase_s, ("the first train step did not complete within watchdog.phase_s "
                             f"({phase_s:g} s)")
  if timeout_s > 0:
    return since + timeout_s, f"no train step completed for watchdog.timeout_s ({timeout_s:g} s)"
  median = watch.median()
  timeout = max(AUTO_MIN_S, AUTO_FACTOR * median)
  return since + timeout, (f"no train step completed for {timeout:.0f} s ({AUTO_FACTOR} x the "
                           f"median step {median:.3g} s, at least {AUTO_MIN_S:g} s)")


# -- the record: workdir/goodput.jsonl ------------------------------------------------------

class Record:
  """Appends this process's timing to workdir/goodput.jsonl, one JSON object per line:
  {"event": "start", "started": unix time the process started, "step": step resumed from, ...},
  then one "row" per metrics row (its `step`, the interval's `parts` by category, `step_times`
  [[step, seconds], ...] timed in it) and an "end" after the last save (`parts` since the last
  row). Every line has `time` (unix). active=False (every process but 0) writes nothing."""

  def __init__(self, workdir: paths.PathLike, active: bool = True):
    self.file, self.active, self._fresh = paths.path(workdir) / FILE, active, True

  def write(self, event: str, **fields) -> None:
    if self.active:
      metrics_lib.append_jsonl(self.file, {"event": event, "time": time.time(), **fields},
                               fresh=self._fresh)
      self._fresh = False


@dataclasses.dataclass
class Process:
  """One process's records: its start, its rows and end, and the step the next one resumed
  from (None for the last)."""
  start: dict
  rows: list = dataclasses.field(default_factory=list)
  end: dict | None = None
  next_resumed: int | None = None
  next_started: float | None = None

  @property
  def last_time(self) -> float:
    """Its last record's time; its start for one that wrote no row (what it did until the
    next one started is all `down`)."""
    records = self.records()
    return records[-1]["time"] if records else self.start["started"]

  def records(self) -> list[dict]:
    return self.rows + ([self.end] if self.end else [])

  def parts(self) -> dict[str, float]:
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for r in self.records():
      for c, v in r.get("parts", {}).items():
        totals[c] = totals.get(c, 0.0) + v
    return totals

  def lost(self) -> tuple[float, int]:
    """(step seconds, steps) trained after the step the next process resumed from."""
    if self.next_resumed is None:
      return 0.0, 0
    seconds, previous = 0.0, self.start["step"]
    for r in self.records():
      if r["step"] > previous and r["step"] > self.next_resumed:
        again = r["step"] - max(previous, self.next_resumed)
        seconds += r.get("parts", {}).get("step", 0.0) * again / (r["step"] - previous)
      previous = max(previous, r["step"])
    return seconds, max(0, previous - self.next_resumed)


def processes(records: list[dict]) -> list[Process]:
  """goodput.jsonl's records -> one Process per start, in order."""
  out = []
  for r in records:
    if r.get("event") == "start":
      if out:
        out[-1].next_resumed, out[-1].next_started = r["step"], r["started"]
      out.append(Process(r))
    elif out and r.get("event") == "row":
      out[-1].rows.append(r)
    elif out and r.get("event") == "end":
      out[-1].end = r
  return out


def load(workdir: paths.PathLike) -> list[Process]:
  return processes(metrics_lib.read_jsonl(paths.path(workdir) / FILE))


def job_so_far(earlier: list[Process], started: float, resumed: int) -> tuple[float, float]:
  """(the job's start, its productive seconds so far) for a process that started at `started`
  and resumed from step `resumed`, after the `earlier` ones."""
  if not earlier:
    return started, 0.0
  earlier[-1].next_resumed, earlier[-1].next_started = resumed, started
  productive = sum(p.parts()["step"] - p.lost()[0] for p in earlier)
  return earlier[0].start["started"], productive


def summarize(procs: list[Process]) -> dict:
  """The job's wall time, goodput, badput by cause, each process's parts, and its step times."""
  if not procs:
    raise ValueError(f"no {FILE} records: the run predates them or never reached its loop")
  wall = max(p.last_time for p in procs) - procs[0].start["started"]
  badput = dict.fromkeys([c for c in CATEGORIES if c != "step"] + ["lost", "down"], 0.0)
  productive, runs = 0.0, []
  for p in procs:
    parts = p.parts()
    lost, lost_steps = p.lost()
    productive += parts["step"] - lost
    for c in badput:
      badput[c] += parts.get(c, 0.0)
    badput["lost"] += lost
    if p.next_started is not None:
      badput["down"] += max(0.0, p.next_started - p.last_time)
    last = p.records()[-1]["step"] if p.records() else p.start["step"]
    runs.append(dict(started=p.start["started"], resumed_from=p.start["step"], last_step=last,
                     ended=p.end is not None, wall_s=p.last_time - p.start["started"],
                     first_step_s=next((r["first_step_s"] for r in p.rows
                                        if "first_step_s" in r), None),
                     lost_steps=lost_steps, parts={c: round(v, 3) for c, v in parts.items()}))
  times = sorted(((s, t) for p in procs for r in p.rows for s, t in r.get("step_times", [])),
                 key=lambda st: st[1])
  steps = {}
  if times:
    seconds = [t for _, t in times]
    steps = dict(timed=len(times), median_s=statistics.median(seconds),
                 p90_s=seconds[int(0.9 * (len(seconds) - 1))], max_s=seconds[-1],
                 worst=[[s, round(t, 4)] for s, t in times[::-1][:5]])
  return dict(wall_s=round(wall, 3), goodput=round(productive / wall, 4) if wall > 0 else None,
              productive_s=round(productive, 3),
              badput_s={c: round(v, 3) for c, v in badput.items()},
              unaccounted_s=round(wall - productive - sum(badput.values()), 3),
              processes=runs, steps=steps)


def describe(summary: dict) -> str:
  """The summary in a few lines for people."""
  wall = summary["wall_s"]
  pct = lambda s: f"{100 * s / wall:.1f}%" if wall else "-"
  lines = [f"wall time {wall:.1f} s over {len(summary['processes'])} process(es); goodput "
           f"{pct(summary['productive_s'])} ({summary['productive_s']:.1f} s in train steps "
           "that count)",
           "badput: " + ", ".join(f"{c} {v:.1f} s ({pct(v)})"
                                  for c, v in sorted(summary["badput_s"].items(),
                                                     key=lambda cv: -cv[1]) if v > 0)]
  if abs(summary["unaccounted_s"]) > 0.001 * max(wall, 1):
    lines.append(f"unaccounted: {summary['unaccounted_s']:.1f} s")
  if summary["steps"]:
    s = summary["steps"]
    lines.append(f"steps: {s['timed']} timed, median {s['median_s']:.4f} s, p90 "
                 f"{s['p90_s']:.4f} s, worst " +
                 ", ".join(f"step {st} {t:.3f} s" for st, t in s["worst"]))
  for i, run in enumerate(summary["processes"]):
    notes = [f"{run['wall_s']:.1f} s", "ended" if run["ended"] else "no end record"]
    if run["first_step_s"] is not None:
      notes.append(f"first step done {run['first_step_s']:.1f} s after its start")
    if run["lost_steps"]:
      notes.append(f"{run['lost_steps']} steps lost")
    lines.append(f"process {i}: steps {run['resumed_from']} -> {run['last_step']}, " +
                 ", ".join(notes))
  return "\n".join(lines)


COLOURS = dict(step="#2ca02c", input="#d62728", host="#9467bd", compile="#ff7f0e",
               eval="#1f77b4", checkpoint="#8c564b", restore="#e377c2", startup="#7f7f7f",
               profile="#bcbd22", lost="#000000", down="#c7c7c7")


def plot(procs: list[Process], summary: dict, path: paths.PathLike) -> None:
  """PNG: the job's wall time by cause; each row's interval split over the job's time; the
  step times by step (log scale) with the median and the worst ones marked."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  fig, (whole, over_time, steps) = plt.subplots(3, 1, figsize=(9, 8.5),
                                                gridspec_kw=dict(height_ratios=(1, 3, 3)))
  wall = summary["wall_s"]
  causes = [("step", summary["productive_s"])] + sorted(
      ((c, v) for c, v in summary["badput_s"].items() if v > 0), key=lambda cv: -cv[1])
  left = 0.0
  for cause, seconds in causes:
    whole.barh(0, seconds, left=left, color=COLOURS[cause])
    if seconds > 0.06 * wall:
      whole.text(left + seconds / 2, 0, f"{cause}\n{100 * seconds / wall:.0f}%", ha="center",
                 va="center", fontsize=8, color="white")
    left += seconds
  whole.set_yticks([])
  whole.set_xlim(0, max(wall, left))
  whole.set_xlabel("seconds of the job's wall time")
  whole.set_title(f"goodput {100 * (summary['goodput'] or 0):.1f}% of {wall:.0f} s "
                  f"({len(procs)} process{'es' if len(procs) > 1 else ''})", fontsize=10)
  t0 = procs[0].start["started"]
  for p in procs:
    for r in p.records():
      parts = r.get("parts", {})
      width = sum(parts.values())
      bottom = 0.0
      for c in CATEGORIES:
        share = parts.get(c, 0.0) / width if width else 0.0
        over_time.bar(r["time"] - t0 - width, share, width=width, bottom=bottom, align="edge",
                      color=COLOURS[c], linewidth=0)
        bottom += share
  over_time.set_xlim(0, wall)
  over_time.set_ylim(0, 1)
  over_time.set_xlabel("seconds since the job started (a bar per metrics row, as wide as its "
                       "interval)")
  over_time.set_ylabel("share of the interval")
  timed = sorted((s, t) for p in procs for r in p.rows for s, t in r.get("step_times", []))
  if timed:
    steps.scatter([s for s, _ in timed], [t for _, t in timed], s=3, color=COLOURS["step"])
    steps.axhline(summary["steps"]["median_s"], color="k", linewidth=0.8,
                  label=f"median {summary['steps']['median_s']:.4f} s")
    for s, t in summary["steps"]["worst"]:
      steps.annotate(str(s), (s, t), fontsize=7, textcoords="offset points", xytext=(0, 4),
                     ha="center")
    steps.set_yscale("log")
    steps.legend(fontsize=8, loc="upper right")
  steps.xaxis.set_major_locator(MaxNLocator(integer=True))
  steps.set_xlabel("step (labels: the slowest)")
  steps.set_ylabel("step time (s)")
  steps.grid(alpha=0.3)
  shown = [c for c in (*CATEGORIES, "lost", "down")
           if c == "step" or summary["badput_s"].get(c, 0) > 0]
  fig.legend(handles=[matplotlib.patches.Patch(color=COLOURS[c], label=c) for c in shown],
             loc="lower center", ncol=len(shown), fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  paths.write_with(path, lambda f: fig.savefig(f, dpi=110, format="png"))
  plt.close(fig)
