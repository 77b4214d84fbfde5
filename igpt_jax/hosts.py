"""The processes of one job telling each other small values, through jax's coordination service.

  share(tag, value) -> [the value of process 0, 1, ...]   each process gives its own
  from_process_0(tag, fn) -> fn() as process 0 ran it      fn runs on process 0 alone

For decisions every host must take alike (which checkpoint to restore, which palette to read),
before a device collective can run or where one would hang on a process that went another
way: the values go through the key-value store of the service `jax.distributed.initialize`
started, never through the devices. Values are JSON. With one process, nothing is sent.

Every process makes the same calls in the same order, as with jax's collectives: the n-th call
of a process meets the n-th call of the others (a tag names it in the store, for the reader;
it need not be unique). A process waits for the others up to WAIT_S; a process that is gone
ends the job sooner, through jax's heartbeat (docs/faults.md).
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Callable

import jax

WAIT_S = 3600.0  # a peer may be reading a large checkpoint, or fitting the palette

_calls = itertools.count()


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state.client


def _key(tag: str) -> str:
  return f"igpt_hosts/{next(_calls)}/{tag}"


def _get(key: str, tag: str, process: int) -> Any:
  try:
    return json.loads(_client().blocking_key_value_get(key, int(WAIT_S * 1000)))
  except Exception as e:  # pylint: disable=broad-except  # jax raises its runtime's error
    raise TimeoutError(f"process {process} of {jax.process_count()} did not tell {tag!r} within "
                       f"{WAIT_S:.0f} s ({type(e).__name__}: {str(e)[:200]})") from e


def share(tag: str, value: Any) -> list:
  """Every process's value, in process order (each process passes its own)."""
  if jax.process_count() == 1:
    return [value]
  key = _key(tag)
  _client().key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
  return [_get(f"{key}/{i}", tag, i) for i in range(jax.process_count())]


def from_process_0(tag: str, fn: Callable[[], Any]) -> Any:
  """fn() run by process 0 alone, its (JSON) result returned on every process; the others wait.

  An exception in fn is raised on process 0, and on the others as a RuntimeError naming it.
  """
  if jax.process_count() == 1:
    return fn()
  key = _key(tag)
  if jax.process_index() != 0:
    told = _get(key, tag, 0)
    if "error" in told:
      raise RuntimeError(f"process 0 failed at {tag}: {told['error']}")
    return told["value"]
  try:
    value = fn()
  except Exception as e:
    first_line = (str(e).strip().splitlines() or [""])[0][:300]
    _client().key_value_set(key, json.dumps({"error": f"{type(e).__name__}: {first_line}"}))
    raise
  _client().key_value_set(key, json.dumps({"value": value}))
  return value
