"""The one path layer: every file the project reads or writes, on a local disk or in a bucket.

Paths are strings or `etils.epath.Path`s; `gs://bucket/...` (and the other schemes epath knows:
s3://, az://) behave as local ones do. epath is what orbax itself uses, so a checkpoint manager
given a `gs://` workdir writes there with its object-store commit, not a directory rename.

  path(p) -> epath.Path              remote(p) -> bool      absolute(p) -> str
  read_json / write_json             load_npy / save_npy    write_with(p, fn)
  append_bytes(p, data)              new bytes at the end of a file, without rewriting it
  move(src, dst)                     a file or directory, local or in a bucket

gs:// goes through gcsfs (epath's fsspec backend), also where TensorFlow is installed: epath
would otherwise pick TensorFlow's GCS filesystem, which neither honours an emulator (the tests
run against one on localhost) nor appends. `EPATH_USE_TF` in the environment still decides.
TensorFlow reads gs:// itself only inside igpt_jax/data.py (tfds records, image-folder files).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Callable
import uuid

from etils import epath
from etils.epath import backend as epath_backend
import fsspec
import numpy as np

# Before any gs:// path is touched: epath reads it on every call.
os.environ.setdefault("EPATH_USE_TF", "false")
# gcsfs would answer exists / open / listings from the listings it has cached: objects that other
# processes wrote since (another host's checkpoint shards, the probe's results read by a
# notebook) would stay invisible to this one.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  return epath.Path(p)


def remote(p: PathLike) -> bool:
  """True for a URI with a scheme (gs://, s3://, ...), False for a local path."""
  return "://" in os.fspath(p)


def absolute(p: PathLike) -> str:
  """p as a string that means the same from any directory (URIs unchanged)."""
  return os.fspath(p) if remote(p) else os.fspath(path(p).resolve())


def write_with(p: PathLike, write: Callable[[io.BytesIO], Any]) -> None:
  """Writes the bytes that write(buffer) puts in a buffer (a PNG, a plot, an .npy) to p.

  One upload per file on an object store; the parent directory is created locally.
  """
  buffer = io.BytesIO()
  write(buffer)
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(buffer.getvalue())


def save_npy(p: PathLike, array) -> None:
  write_with(p, lambda f: np.save(f, np.asarray(array)))


def load_npy(p: PathLike) -> np.ndarray:
  with path(p).open("rb") as f:
    return np.load(io.BytesIO(f.read()))


def write_json(p: PathLike, obj, **kwargs) -> None:
  write_with(p, lambda f: f.write(json.dumps(obj, **kwargs).encode()))


def read_json(p: PathLike):
  return json.loads(path(p).read_text())


def append_bytes(p: PathLike, data: bytes) -> None:
  """Adds data at the end of file p (created if missing), sending only data.

  Local files are appended to. Object-store objects cannot be appended to: on GCS the data is
  uploaded as an object of its own and composed onto the end of p server-side (GCS compose), so
  each call writes len(data) bytes whatever the size of p; other schemes rewrite p whole.
  """
  p = path(p)
  if not remote(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("ab") as f:
      f.write(data)
    return
  if not p.exists():
    p.write_bytes(data)
    return
  if not os.fspath(p).startswith("gs://"):
    p.write_bytes(p.read_bytes() + data)
    return
  part = p.parent / f".{p.name}.{uuid.uuid4().hex}.part"
  part.write_bytes(data)
  try:
    _fs(p).merge(os.fspath(p), [os.fspath(p), os.fspath(part)])
  finally:
    part.unlink(missing_ok=True)


def move(src: PathLike, dst: PathLike) -> None:
  """Moves a file or directory to dst (its parent created if needed); on an object store every
  object is copied, then deleted (a bucket has no folders to rename)."""
  src, dst = path(src), path(dst)
  if not remote(dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
  else:  # copy then delete: gcsfs's mv would try GCS's moveTo first, which not every server has
    fs = _fs(src)
    fs.copy(os.fspath(src), os.fspath(dst), recursive=True)
    fs.rm(os.fspath(src), recursive=True)


def _fs(p: epath.Path):
  """The fsspec filesystem epath itself uses for p, so that its listing cache sees our writes."""
  return epath_backend.fsspec_backend.fs(p)
