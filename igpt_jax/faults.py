"""How a run ends when something outside it breaks: one line, a documented status, no noise.

  Fault                    an exception whose message is the run's one error line and whose
                           `status` is the process's exit status
  exit_on_fault()          launch scripts: a Fault is logged as that line, then `exit_now`
  exit_now(status)         flushes the logs and leaves at once, without interpreter shutdown
  exit_done()              a launch script's last call: leave the job, exit_now(0)
  PeerLost, peer_watch()   a collective failed because a process of the job is gone
  pulse_watch()            a process of the job went silent while this one waits on it
  last_completed(...)      the last step whose results exist, for PeerLost's line
  watchdog(deadline, line) a hang: every thread's stack to the log, one line, exit HUNG

Exit statuses (docs/faults.md): 0 done (or preempted after a good save); 1 any other error,
with its traceback; SAVE_FAILED (74, sysexits' EX_IOERR) a checkpoint could not be written:
fix the storage, rerun the same command; PEER_LOST (75, EX_TEMPFAIL) a process of a
multi-process job was lost: restart the job, it resumes from the newest checkpoint;
RESTORE_FAILED (75 too) reading a checkpoint kept failing for a reason outside it (a 5xx, a
timeout): rerun the same command once the storage answers; HUNG (124, what GNU timeout exits
with) no train step completed within the watchdog's time: restart the job, it resumes from the
newest checkpoint.

Why os._exit: after a failed save orbax leaves coroutines whose finalizers print tracebacks
while Python shuts down, and with a peer gone jax's exit handler waits on the coordination
service until the heartbeat timeout and then aborts. Everything the run writes is flushed as it
is written (metrics.jsonl, TensorBoard) and the checkpoints are orbax's, so skipping the
shutdown loses nothing.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import re
import sys
import threading
import time
from typing import Callable

import jax

SAVE_FAILED = 74
PEER_LOST = 75
RESTORE_FAILED = 75  # EX_TEMPFAIL too: the storage kept failing while a checkpoint was read
HUNG = 124
# How long survivors wait for each other to answer the roll call that names the lost process.
ROLL_CALL_S = 5.0
# What a collective or the coordination service says when a peer process went away: Gloo (CPU),
# NCCL (GPU), gRPC (the coordination service, DCN transfers).
_PEER_GONE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Gloo .* failed|"
    r"NCCL.*(remote|unhandled system|Connection)|UNAVAILABLE|failed to connect to all addresses|"
    r"Socket closed|connection refused", re.IGNORECASE)


class Fault(Exception):
  """An exception that ends the run with `status`; its message is the whole story, one line."""
  status = 1


class PeerLost(Fault):
  status = PEER_LOST


def exit_now(status: int) -> None:
  """Flushes stdio and every logging handler, then ends the process with `status`."""
  for handler in logging.getLogger().handlers:
    handler.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def exit_done() -> None:
  """The end of a launch script whose outputs are all written and closed: leaves the job (every
  process waits for the others there, as jax's own exit handler would), then exits 0 without
  interpreter shutdown, whose final garbage collection of the run's heap was all that remained
  (2-10 s measured here on the demo, up to a minute after long runs; docs/faults.md)."""
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  exit_now(0)


@contextlib.contextmanager
def exit_on_fault():
  """A Fault raised in the block is logged as one error line; the process exits with its status."""
  try:
    yield
  except Fault as e:
    logging.error("%s", e)
    exit_now(e.status)


def is_peer_loss(error: BaseException) -> bool:
  """Whether an error of a multi-process job says that another process went away."""
  return jax.process_count() > 1 and bool(_PEER_GONE.search(str(error)))


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client


def lost_processes(tag: str = "failure", timeout_s: float = ROLL_CALL_S) -> list[int]:
  """The processes of the job that do not answer roll call `tag` within timeout_s.

  Each survivor writes its key under the tag into the coordination service's key-value store
  and reads the others'; keys outlive their writers, so a survivor that answered and already
  left still counts as alive (a roll call repeated by every process takes a new tag). When the
  service itself is gone, its host (process 0) is the lost one.
  """
  client, me, n = _client(), jax.process_index(), jax.process_count()
  try:
    client.key_value_set(f"igpt_roll_call/{tag}/{me}", "alive")
    deadline = time.monotonic() + timeout_s
    while True:
      answered = {int(k.rsplit("/", 1)[1])
                  for k, _ in client.key_value_dir_get(f"igpt_roll_call/{tag}/")}
      if len(answered) == n or time.monotonic() > deadline:
        return sorted(set(range(n)) - answered)
      time.sleep(0.1)
  except Exception:  # pylint: disable=broad-except  # the coordination service is unreachable
    return [0]


def peer_lost(lost: list[int], what: str, last_step: int, newest: int | None) -> PeerLost:
  """The run's one line for lost processes, noticed because `what` happened."""
  return PeerLost(
      f"lost process {', '.join(map(str, lost))} of {jax.process_count()} ({what}); this is "
      f"process {jax.process_index()}, last completed step {last_step}, newest checkpoint "
      f"{'none' if newest is None else f'step {newest}'}: restart the job to resume from it")


@contextlib.contextmanager
def peer_watch(last_step: Callable[[], int], newest_checkpoint: Callable[[], int | None]):
  """Turns a collective's failure because a process is gone into PeerLost, whose line names the
  lost process, the last completed step and the newest checkpoint (read, never touched)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # jax raises JaxRuntimeError, orbax others
    if isinstance(e, Fault) or not is_peer_loss(e):
      raise
    first = (str(e).strip().splitlines() or [""])[0][:200]
    logging.warning("a collective failed (%s): calling the roll of the job's processes", first)
    lost = lost_processes()
    if not lost:  # everyone answered: not a lost process after all
      raise
    raise peer_lost(lost, f"a collective failed: {first}", last_step(),
                    newest_checkpoint()) from e


# Every process of a multi-process job writes its pulse (a counter under its key in the
# coordination service) every PULSE_S; one whose pulse has not moved for SILENT_S is lost. That
# must stay well under jax's heartbeat timeout (100 s; here it aborted survivors 56 to 100 s
# after a kill), after which jax ends every survivor with SIGABRT instead of this line.
PULSE_S = 1.0
SILENT_S = 20.0
_beating = threading.Event()


def start_pulse() -> None:
  """Starts this process's pulse (once; no-op for a single process): a daemon thread that
  beats until the process exits, so that processes that leave their watches at different times
  never see each other fall silent. `sharding.maybe_initialize_distributed` starts it as the
  process joins the job; pulse_watch does if nothing has."""
  if jax.process_count() == 1 or _beating.is_set():
    return
  _beating.set()
  threading.Thread(target=_beat, args=(_client(), jax.process_index()), name="igpt-pulse",
                   daemon=True).start()


def _beat(client, me: int) -> None:
  count = 0
  while True:
    count += 1
    try:
      client.key_value_set(f"igpt_pulse/{me}", str(count), allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # the listeners judge the silence
      pass
    time.sleep(PULSE_S)


class Silence:
  """Which processes have been silent for SILENT_S, from successive readings of the pulses.

  A process counts from the first reading (a watch starts before its peers' first beats).
  While the coordination service does not answer at all, its host, process 0, is the lost one.
  """

  def __init__(self, processes: int, now: float):
    self.values: dict[int, str] = {}
    self.moved = {p: now for p in range(processes)}
    self.answered = now

  def hear(self, pulses: list[tuple[str, str]] | None, now: float) -> list[int]:
    """pulses: key_value_dir_get's [(key, value)], None when the service did not answer."""
    if pulses is None:
      return [0] if now - self.answered > SILENT_S else []
    self.answered = now
    for key, value in pulses:
      p = int(key.rsplit("/", 1)[1])
      if self.values.get(p) != value:
        self.values[p], self.moved[p] = value, now
    return sorted(p for p, t in self.moved.items() if now - t > SILENT_S)


@contextlib.contextmanager
def pulse_watch(last_step: Callable[[], int], newest_checkpoint: Callable[[], int | None]):
  """Ends this process with PeerLost's line and status when another process of the job falls
  silent (its pulse unmoved for SILENT_S) while the block runs, from a thread of its own: also
  while the main thread waits in a call that would wait for the lost process until jax's
  heartbeat timeout (orbax's barriers around a save, a collective still being set up), where
  no collective fails for peer_watch to see. last_step must not block (the main thread may
  hang on the step in flight). No-op for a single process."""
  if jax.process_count() == 1:
    yield
    return
  start_pulse()
  client, me = _client(), jax.process_index()
  silence = Silence(jax.process_count(), time.monotonic())

  def listen(stopped: Callable[[], bool]):
    try:
      pulses = client.key_value_dir_get("igpt_pulse/")
    except Exception:  # pylint: disable=broad-except  # the service is unreachable
      pulses = None
    lost = [p for p in silence.hear(pulses, time.monotonic()) if p != me]
    if lost and not stopped():
      logging.error("%s", peer_lost(lost, f"silent for {SILENT_S:.0f} s", last_step(),
                                    newest_checkpoint()))
      exit_now(PEER_LOST)

  with _beside(listen, PULSE_S, "igpt-pulse-listener"):
    yield


@contextlib.contextmanager
def _beside(tick: Callable[[Callable[[], bool]], None], poll_s: float, name: str):
  """Calls tick(stopped) every poll_s from a daemon thread of its own while the block runs;
  stopped() says whether the block has ended meanwhile (a tick that would end the process
  asks it last)."""
  stop = threading.Event()

  def loop():
    while not stop.wait(poll_s):
      tick(stop.is_set)

  threading.Thread(target=loop, name=name, daemon=True).start()
  try:
    yield
  finally:
    stop.set()


def last_completed(pending, synced: int) -> int:
  """The last step whose results exist: `synced` (the loop's last host sync), then each pending
  (step, metrics on device) in order until one of them failed."""
  for step, metrics in pending:
    try:
      jax.block_until_ready(metrics)
    except Exception:  # pylint: disable=broad-except  # that step's collective failed
      break
    synced = step
  return synced


@contextlib.contextmanager
def watchdog(deadline: Callable[[], tuple[float | None, str]], line: Callable[[str], str],
             poll_s: float = 1.0):
  """Ends the process when the block hangs: deadline() -> (time.perf_counter() time after which
  the run is hung, or None; what it waits for), asked every poll_s from a thread of its own.
  Past it, the stack of every thread goes to stderr (faulthandler: the Python frames, also of a
  thread blocked in XLA), then line(what) as the run's one error line, and the process exits
  HUNG, so that a scheduler restarts the job."""

  def watch(stopped: Callable[[], bool]):
    when, what = deadline()
    if when is not None and time.perf_counter() > when and not stopped():
      logging.error("the run is hung (%s); the stacks of every thread follow", what)
      for handler in logging.getLogger().handlers:
        handler.flush()
      try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
      except (AttributeError, ValueError, OSError):  # a stderr without a file descriptor
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
      logging.error("%s", line(what))
      exit_now(HUNG)

  with _beside(watch, poll_s, "igpt-watchdog"):
    yield
