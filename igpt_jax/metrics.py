"""A run's scalars: `metrics.jsonl` and TensorBoard events, the one writer and the one reader.

  Writer(workdir, active).write(step, scalars, images)      the training loop (process 0)
  read(workdir) -> {step: record}, steps ascending             every reader of a run's scalars
  append_jsonl(file, record, fresh) / read_jsonl(file)         the JSON-lines files of a run

`workdir/metrics.jsonl` holds one JSON object per logged step: `step` plus the scalars logged at
it (`train_loss`, `eval_loss`, ... in nats per token). A resumed run logs the steps between its
checkpoint and the interruption again: the later record of a step is the one that counts.
TensorBoard events go to `workdir/events.out.tfevents.<time>.<host>.<pid>.<n>` (one file per start),
scalar summaries under the same names, and images (PNG bytes, e.g. the held-out loss by pixel)
under theirs; images are not in metrics.jsonl.

Every `write` sends its own records at once (nothing is lost when the process dies), appended
with `paths.append_bytes`: a local file is appended to; on gs:// the new bytes are uploaded and
composed onto the end of the object server-side, so each flush writes its records' bytes, not the
whole file, however long the run (tensorboardX's own gs:// writer re-uploads the whole file per
flush; the event records here are framed by hand for that reason).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import struct
import time
from typing import Mapping

from igpt_jax import paths

FILE = "metrics.jsonl"
_WRITERS = itertools.count()  # a second writer in the same second gets its own events file


def _record(event_bytes: bytes) -> bytes:
  """One TFRecord frame: length, masked crc32c of the length, data, masked crc32c of the data."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=import-outside-toplevel
  header = struct.pack("<Q", len(event_bytes))
  return (header + struct.pack("<I", masked_crc32c(header)) + event_bytes
          + struct.pack("<I", masked_crc32c(event_bytes)))


def _event(step: int, scalars: Mapping[str, float] | None = None,
           images: Mapping[str, bytes] | None = None) -> bytes:
  """A framed tf.Event: the file-version header (scalars None) or the scalars and PNG images
  of a step."""
  # pylint: disable-next=import-outside-toplevel
  from tensorboardX.proto import event_pb2, summary_pb2
  event = event_pb2.Event(wall_time=time.time(), step=step)
  if scalars is None:
    event.file_version = "brain.Event:2"
  else:
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    for tag, png in (images or {}).items():
      width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR chunk
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=height, width=width, colorspace=4, encoded_image_string=png)))
    event.summary.CopyFrom(summary_pb2.Summary(value=values))
  return _record(event.SerializeToString())


class Writer:
  """Appends each step's scalars to workdir's metrics.jsonl and a TensorBoard events file.

  active=False (every process but 0 of a multi-host job) writes nothing.
  """

  def __init__(self, workdir: paths.PathLike, active: bool = True):
    self.active = active
    root = paths.path(workdir)
    self.jsonl = root / FILE
    self.events = root / (f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}."
                          f"{os.getpid()}.{next(_WRITERS)}")
    self._started = False
    if active:  # the event protos' first import takes seconds: at the start, not the first row
      _event(0)

  def write(self, step: int, scalars: Mapping[str, float],
            images: Mapping[str, bytes] | None = None) -> None:
    """scalars -> metrics.jsonl and TensorBoard; images (PNG bytes by tag) -> TensorBoard."""
    if not self.active:
      return
    events = _event(step, scalars, images)
    if not self._started:
      events = _event(step) + events
    append_jsonl(self.jsonl, {"step": int(step), **scalars}, fresh=not self._started)
    self._started = True
    paths.append_bytes(self.events, events)


def append_jsonl(file: paths.PathLike, record: Mapping, fresh: bool) -> None:
  """Appends record as one JSON line to file. fresh: the first write of this process, which
  starts a new line if a crash cut the file's last write short."""
  line = (json.dumps(dict(record)) + "\n").encode()
  if fresh and _ends_mid_line(paths.path(file)):
    line = b"\n" + line
  paths.append_bytes(file, line)


def _ends_mid_line(file) -> bool:
  """Whether a local file's last byte is not a newline (object-store appends are atomic)."""
  if paths.remote(file) or not file.exists():
    return False
  with file.open("rb") as f:
    if not f.seek(0, os.SEEK_END):  # empty
      return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


def read_jsonl(file: paths.PathLike) -> list[dict]:
  """The records of a JSON-lines file in order ([] when it does not exist). A line that does
  not parse (the tail of a write cut off by a crash on a local disk) is skipped with a warning
  naming it."""
  file = paths.path(file)
  if not file.exists():
    return []
  records = []
  for number, line in enumerate(file.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError("not an object")
      records.append(record)
    except ValueError as e:
      logging.warning("%s line %d is not a metrics record, skipped (%s): %.80s", file, number,
                      e, line)
  return records


def read(workdir: paths.PathLike) -> dict[int, dict]:
  """{step: the last record of that step} in step order; {} when the run has no metrics.jsonl
  (converted weights)."""
  records = {}
  for record in read_jsonl(paths.path(workdir) / FILE):
    if isinstance(record.get("step"), int):
      records[record["step"]] = record
    else:
      logging.warning("a record of %s has no step, skipped: %.80s",
                      paths.path(workdir) / FILE, record)
  return dict(sorted(records.items()))
