"""Profiler traces of chosen train steps, written into the workdir (config.profile).

  Profiler(pcfg, workdir, total_steps, ledger)  .before(step) / .after(step, outputs) / .close()
  start_server(port)                     jax's profiler server, for captures on demand

A window of `pcfg.steps` steps from `pcfg.start_step` (then every `pcfg.period` steps, if > 0)
is traced with `jax.profiler` on the processes `pcfg.processes` (empty: all). The last step's
outputs are waited for before the trace stops, so it holds the window's device work. A trace
lands in workdir/plugins/profile/<run>/: <host>.xplane.pb, which TensorBoard's profile plugin
and XProf open when pointed at the workdir (the same directory as the run's scalars), and
perfetto_trace.json.gz, which Perfetto (ui.perfetto.dev) opens. In a bucket the trace is written
to a local temporary directory, then copied up (the profiler writes local files only).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from absl import logging
import jax
import ml_collections

from igpt_jax import paths


class Profiler:
  """Starts and stops jax.profiler traces around the configured windows of steps."""

  def __init__(self, pcfg: ml_collections.ConfigDict, workdir: str, total_steps: int, ledger):
    self.cfg, self.workdir, self.total, self.ledger = pcfg, workdir, total_steps, ledger
    processes = tuple(pcfg.processes)
    self.active = pcfg.start_step > 0 and pcfg.steps > 0 and (
        not processes or jax.process_index() in processes)
    self._first, self._stop_at, self._local = 0, None, None

  def _starts(self, step: int) -> bool:
    offset = step - self.cfg.start_step
    return offset == 0 or (offset > 0 and self.cfg.period > 0 and offset % self.cfg.period == 0)

  def before(self, step: int) -> None:
    """Before step is dispatched: starts a trace if a window begins here."""
    if not self.active or self._stop_at is not None or not self._starts(step):
      return
    self._stop_at = min(step + self.cfg.steps - 1, self.total)
    self._local = (tempfile.mkdtemp(prefix="igpt_profile_") if paths.remote(self.workdir)
                   else self.workdir)
    self._first = step
    with self.ledger.phase("profile"):
      jax.profiler.start_trace(self._local, create_perfetto_trace=True)

  def after(self, step: int, outputs) -> bool:
    """After step was dispatched; at a window's last step, waits for outputs and writes the
    trace. -> whether it did."""
    if step != self._stop_at:
      return False
    with self.ledger.phase("step"):
      jax.block_until_ready(outputs)
    self._stop()
    return True

  def _stop(self) -> None:
    with self.ledger.phase("profile"):
      before = _runs(self._local)
      jax.profiler.stop_trace()
      runs = _runs(self._local) - before
      where = [os.path.join(self._local, "plugins", "profile", r) for r in sorted(runs)]
      if paths.remote(self.workdir):
        where = [_upload(self._local, w, self.workdir) for w in where]
        shutil.rmtree(self._local, ignore_errors=True)
    logging.info("profile of steps %d-%d (process %d) written to %s: TensorBoard's profile tab "
                 "or XProf with --logdir %s; Perfetto (ui.perfetto.dev) opens its "
                 "perfetto_trace.json.gz", self._first, self._stop_at, jax.process_index(),
                 ", ".join(where) or "(nothing written)", self.workdir)
    self._stop_at = None

  def close(self) -> None:
    """At the end of the run: a window still open is written as it is."""
    if self._stop_at is not None:
      self._stop_at = self.total  # what it holds
      self._stop()


def _runs(local: str) -> set[str]:
  root = os.path.join(local, "plugins", "profile")
  return set(os.listdir(root)) if os.path.isdir(root) else set()


def _upload(local: str, run_dir: str, workdir: str) -> str:
  """Copies a trace's files from the local directory to the same place under workdir."""
  relative = os.path.relpath(run_dir, local)
  for name in os.listdir(run_dir):
    with open(os.path.join(run_dir, name), "rb") as f:
      (paths.path(workdir) / relative / name).write_bytes(f.read())
  return os.fspath(paths.path(workdir) / relative)


def start_server(port: int) -> None:
  """jax's profiler server on port (0: none), for TensorBoard's "capture profile" or
  `python -m jax.collect_profile <port> <ms>` while the run goes on."""
  if port > 0:
    jax.profiler.start_server(port)
    logging.info("profiler server on port %d of process %d", port, jax.process_index())
