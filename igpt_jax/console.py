"""What a launch script prints: our own lines, real warnings, and progress of the long steps.

  setup()                          first statement of every launch script, before its imports
  compilation_cache(directory)     jax's persistent compilation cache there ("": off)
  progress(iterable, desc, total)  a tqdm bar over a loop (feature batches, probe fits)
  status(desc)                     elapsed time of one blocking call (a k-means fit, a decode)
  first_call(fn, desc)             fn whose first call, the one jax compiles, shows a status

On a terminal a bar is one line updated in place; elsewhere (a log file, CI) it is a plain line
at the start, at most every 30 s, and at the end. Only process 0 of a multi-process job draws
them. TQDM_DISABLE=1 turns them off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import logging
import os
import pkgutil
import sys
import tempfile
import threading
from typing import Callable, Iterable

from absl import logging as absl_logging
import tqdm

# Source directories whose INFO lines are ours (a checkout also has launch/ and bench/).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_DIRS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("igpt_jax", "launch", "bench"))
_TPU_FAILURE = "Unable to initialize backend 'tpu'"
# orbax warns on every read-only CheckpointManager; checkpoint.load opens one on purpose.
_READ_ONLY = ("checkpoint_manager.py", "Given directory is read only")
# orbax's reports of a failed background save, each with the write's traceback (several per
# failed file); checkpoint.check_saves raises the same error as one SaveFailed line.
_ORBAX_SAVE_FAILURES = ("_SignalingThread.run() raised an exception",
                        "Handler Commit operations or the Commit callback",
                        "[wait_until_finished] Save Finalize thread",
                        "Checkpointer failed: one or more items may not be finalized")


# What the CUDA plugin's libraries log when they load on a host without the NVIDIA driver, and
# the notice absl's C++ logging puts before each line logged ahead of its initialisation.
_NO_DRIVER = "Could not find cuda drivers on your machine"
_ABSL_EARLY = "WARNING: All log messages before absl::InitializeLog() is called"


def _driver_notice(lines: list, i: int) -> bool:
  return _NO_DRIVER in lines[i] or (lines[i].startswith(_ABSL_EARLY) and i + 1 < len(lines)
                                    and _NO_DRIVER in lines[i + 1])


@contextlib.contextmanager
def without_driver_notices():
  """Drops the CUDA plugin's no-driver notices from stderr while the block runs.

  Importing jax and registering the plugin load CUDA libraries whose stub reports, from C++
  past any logging filter, that there is no GPU driver: true and expected on a CPU host. Those
  lines (and absl's notice before each) are dropped; whatever else reaches stderr meanwhile is
  passed on when the block ends. It re-points file descriptor 2 while it runs: launch-time
  set-up only (`setup`), never on import.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(l for i, l in enumerate(lines) if not _driver_notice(lines, i)))
      sys.stderr.flush()


def _has_tpu_chips() -> bool:
  from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
  return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def _has_accelerator_plugin() -> bool:
  """Whether a PJRT plugin (CUDA, ROCm, ...) is installed and its driver with it; libtpu is not
  loaded as one. The CUDA plugin alone (the gpu-plan extra, for compile-only GPU plans) does
  not count on a host without the NVIDIA driver: there the CPU is all there is to use."""
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
    names = {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
  except ImportError:
    names = set()
  names |= {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
  return any(not name.startswith(("xla_cuda", "cuda")) or _has_nvidia_driver() for name in names)


def _has_nvidia_driver() -> bool:
  try:
    ctypes.CDLL("libcuda.so.1")
  except OSError:
    return False
  return True


class _ConsoleFilter(logging.Filter):
  """Passes warnings, errors and our own INFO lines; drops other libraries' INFO chatter.

  Dropped that way: orbax's line for every save and restore, matplotlib's font cache notice,
  orbax's warning that a read-only checkpoint manager is read-only (that exact record), orbax's
  tracebacks of a failed background save (the loop reports it as one line instead), and
  jax's "Unable to initialize backend 'tpu'" on a host without TPU chips (libtpu is installed
  for ahead-of-time TPU compiles; jax tries it first and falls back to the CPU). On a host that
  has TPU chips that failure means the run is not on them: it is shown as a warning.
  """

  def filter(self, record):
    if (os.path.basename(record.pathname) == _READ_ONLY[0] and
        record.getMessage().startswith(_READ_ONLY[1])):
      return False
    if (f"{os.sep}orbax{os.sep}" in record.pathname and
        any(m in record.getMessage() for m in _ORBAX_SAVE_FAILURES)):
      return False
    if record.getMessage().startswith(_TPU_FAILURE):
      if not _has_tpu_chips():
        return False
      record.levelno, record.levelname = logging.WARNING, "WARNING"
      return True
    return record.levelno >= logging.WARNING or record.pathname.startswith(_OWN_DIRS)


class _AbandonedWrites(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for orbax's own write tasks."""

  def filter(self, record):
    message = record.getMessage()
    return not (message.startswith("Task exception was never retrieved") and
                f"{os.sep}orbax{os.sep}" in message)


def _quiet_abandoned_writes() -> None:
  """Drops what orbax leaves behind when one write of a save or restore fails.

  orbax then gives up on the call and closes its event loop while TensorStore still holds the
  other writes or reads: each of their completions tries to wake the closed loop (Python prints
  `RuntimeError: Event loop is closed`, six lines of traceback, for every one: dozens for a full
  disk), and asyncio logs each abandoned task's error when it is collected ("Task exception was
  never retrieved"). The failure itself is reported once: checkpoint.SaveFailed, or the
  warning of an unreadable checkpoint.
  """
  if getattr(sys.unraisablehook, "quiets_closed_loops", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)
  hook.quiets_closed_loops = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_AbandonedWrites())


@functools.cache  # once per process
def setup() -> None:
  """A launch script's process set-up, for a console without third-party noise; once.

  Call it first, before the script imports jax (or anything that does), TensorFlow or orbax:

    from igpt_jax import console
    console.setup()

  jax is imported (and its plugins registered) inside `without_driver_notices`, so that a host
  with the CUDA compiler plugin for GPU plans (the gpu-plan extra) but no GPU starts clean.
  TensorFlow (only igpt_jax/data.py imports it, lazily, for tf.data) prints a oneDNN banner on
  import, twice, that TF_CPP_MIN_LOG_LEVEL does not silence: TF_ENABLE_ONEDNN_OPTS=0 turns off
  the oneDNN kernels it announces (for convolutions and matmuls; the input pipeline resizes,
  crops and gathers) and so the banner. TF_CPP_MIN_LOG_LEVEL=1 drops TensorFlow's other C++
  INFO lines (the CPU-feature notice), keeping its warnings and errors. A value already in the
  environment wins. Python logging records go through `_ConsoleFilter` on absl's handler, and
  what a failed orbax write leaves behind is dropped (`_quiet_abandoned_writes`). Library
  modules never do any of this on import: a notebook or another program that imports igpt_jax
  keeps its process as it was.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  with without_driver_notices():
    import jax  # pylint: disable=import-outside-toplevel
  if (os.environ.get("JAX_PLATFORMS") is None and not _has_tpu_chips()
      and not _has_accelerator_plugin()):
    # Only the CPU is there to use. Naming it keeps libtpu (installed for ahead-of-time plans)
    # from initialising on a host without TPU chips: it would print its own start-up errors to
    # stderr, past any logging filter, and hold /tmp/libtpu_lockfile while the run lasts.
    jax.config.update("jax_platforms", "cpu")
  if jax.config.jax_platforms:
    # The platforms are fixed, so registering jax's plugins now changes nothing (a plugin
    # outside them is not validated) but keeps the CUDA plugin's no-driver notice, which it
    # logs when registered, off the console. jax registers them once, at its first backend.
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    with without_driver_notices():
      getattr(xla_bridge, "_discover_and_register_pjrt_plugins", lambda: None)()
  absl_logging.get_absl_handler().addFilter(_ConsoleFilter())
  _quiet_abandoned_writes()


# Programs that compile faster than this are not worth a file each (jax's default is 1 s,
# which would leave out the small models' train steps on a CPU).
CACHE_MIN_COMPILE_S = 0.2


def compilation_cache(directory: str) -> None:
  """Turns jax's persistent compilation cache on at directory (~ expanded; local or gs://) or,
  for "", off: a restart then loads its programs instead of compiling them. Call at launch,
  before the first compile."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache as cache  # pylint: disable=import-outside-toplevel
  directory = os.path.expanduser(directory) if directory else None
  if directory != jax.config.jax_compilation_cache_dir:
    cache.reset_cache()  # jax reads the directory once, at its first compile
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
  if directory:
    absl_logging.info("persistent compilation cache: %s", directory)


class _Lines:
  """tqdm's output off a terminal: each refresh as one plain line, without carriage returns.

  A line whose count is the last one's (the text before the times in brackets: tqdm redraws a
  finished bar on close) is not repeated.
  """

  def __init__(self, stream):
    self.stream = stream
    self.last = None

  def write(self, text: str) -> None:
    text = text.strip("\r\n").rstrip()
    count = text.rsplit(" [", 1)[0]  # the times are the last bracket: a desc may hold others
    if text and count != self.last:
      self.stream.write(text + "\n")
      self.last = count

  def flush(self) -> None:
    self.stream.flush()


def _interval() -> float:
  """Seconds between refreshes: live on a terminal, a line now and then in a log."""
  return 0.5 if sys.stderr.isatty() else 30.0


def _bar(**kwargs) -> tqdm.tqdm:
  import jax  # pylint: disable=import-outside-toplevel
  tty = sys.stderr.isatty()
  if jax.process_index() != 0:
    kwargs["disable"] = True
  return tqdm.tqdm(file=sys.stderr if tty else _Lines(sys.stderr), mininterval=_interval(),
                   maxinterval=max(_interval(), 10.0), dynamic_ncols=tty, **kwargs)


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None,
             unit: str = "it") -> tqdm.tqdm:
  """A bar over `iterable` (or moved by hand: `bar.update(n)`), showing rate and ETA.

  Use it as a context manager (or close it) so that the final count is printed.
  """
  return _bar(iterable=iterable, desc=desc, total=total, unit=unit)


def _tick(bar: tqdm.tqdm, stop: threading.Event) -> None:
  while not stop.wait(_interval()):
    bar.refresh()  # a no-op when disabled


@contextlib.contextmanager
def status(desc: str):
  """Shows `desc: <elapsed>` while the block runs (refreshed from a thread: the block may be one
  long call into XLA), then `desc: <elapsed> done`."""
  bar = _bar(desc=desc, total=None, bar_format="{desc}: {elapsed}{postfix}")
  stop = threading.Event()
  ticker = threading.Thread(target=_tick, args=(bar, stop), daemon=True)
  ticker.start()
  try:
    yield bar
    bar.set_postfix_str("done", refresh=False)
  finally:
    stop.set()
    ticker.join()
    bar.close()


def first_call(fn: Callable, desc: str) -> Callable:
  """fn, whose first call (where a jitted function is traced and compiled) runs in status(desc).

  Dispatch is asynchronous, so the status covers the compile, not the whole first execution.
  """
  pending = [True]

  @functools.wraps(fn)
  def call(*args, **kwargs):
    if not pending:
      return fn(*args, **kwargs)
    pending.clear()
    with status(desc):
      return fn(*args, **kwargs)

  return call
