"""Feature extraction: one jitted program over the mesh, in memory or streamed to shards on disk.

Every path (the offline probe, the in-training probe, launch/plan.py's "extract") compiles
`features_fn` and runs it through `featurizer`: the parameters in their training layout over
the mesh (replicated over data, split over fsdp / tensor), the batch split over the mesh's batch
axes across every process. Each process passes its own rows and gets its own rows back.

On disk (`write_features`) a split is a set of shards, one per `shard_batches` eval batches of
each process: `{split}/{name}/p{process:03d}_s{shard:05d}.npy` for every feature name, then a
marker `{split}/done/p{process:03d}_s{shard:05d}.json` (rows, names, dtype) written last. A
shard whose marker is there on every process is not recomputed, so an extraction that was
preempted resumes where it stopped. Readers (`load_feature`, `shards`) see marked shards only,
in (process, shard) order: the order of the split's rows.

The offline probe names each split's set by what it holds (`feature_set`): `{role}_{hash}`, with
`spec.json` saying what (checkpoint, data and split, model, reading, dtype, feature names) and,
once complete, how many rows. A probe of another split, other layers or another checkpoint gets
a set of its own beside the others; a complete set of the same spec holding every feature asked
for is reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from typing import Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from igpt_jax import paths
from igpt_jax import sharding as sharding_lib
from igpt_jax import steps as steps_lib

PIXEL_KINDS = ("histogram", "rgb")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@functools.lru_cache(maxsize=8)
def features_fn(cfg: model_lib.IGPTConfig, layers: tuple[int, ...], reading: str,
                k_masks: int = 0) -> Callable:
  """Jitted (params, tokens [B, T], key) -> {layer: float32 [B, F]}, run where its inputs lie.

  BERT models are read unmasked (k_masks 0: an all-False mask zeroes no embedding) or, as the
  paper evaluates them, averaged over k_masks passes each with a fresh 15% mask drawn from key.
  Call it under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(sharding.RULES)`.
  """
  model = model_lib.IGPT(cfg)

  def one_pass(params, tokens, mask):
    out = model.apply({"params": params}, tokens, layers, reading, mask,
                      method=model_lib.IGPT.features)
    return {l: nn.with_logical_constraint(f, ("batch", None)) for l, f in out.items()}

  def features(params, tokens, key):
    if cfg.objective != "bert":
      return one_pass(params, tokens, None)
    if not k_masks:
      return one_pass(params, tokens, jnp.zeros(tokens.shape, bool))
    passes = [one_pass(params, tokens, model_lib.draw_bert_mask(k, tokens.shape))
              for k in jax.random.split(key, k_masks)]
    return jax.tree.map(lambda *f: sum(f) / k_masks, *passes)

  return jax.jit(features)


def token_features(cfg: model_lib.IGPTConfig, params, tokens, layers: Sequence[int]):
  """Per-token features for the attentive probe: float32 [B, T, D], the mean over `layers` of
  each layer's ln_1 output (layer n_layer: the ln_f output), before any pooling.

  Traceable (called inside the attentive probe's jitted programs); BERT models are read
  unmasked. Scanned blocks are run one by one here (their parameters sliced off the layer axis),
  so only the layers asked for are kept, never a [L, B, T, D] stack.
  """
  layers = tuple(sorted(set(layers)))
  model_lib.check_layers(cfg, layers)
  if cfg.scan_layers:
    blocks = {f"h_{i}": jax.tree.map(lambda x, i=i: x[i], params["h"]) for i in range(cfg.n_layer)}
    params = {**{k: v for k, v in params.items() if k != "h"}, **blocks}
  cfg = cfg.replace(scan_layers=False, remat="none")  # a forward pass: nothing to save for grads
  wanted = {f"h_{l}" for l in layers if l < cfg.n_layer}

  def captured(module, method):  # the ln_1 of the blocks asked for, and ln_f
    return method == "__call__" and (
        module.name == "ln_f" or (module.name == "ln_1" and module.parent.name in wanted))

  mask = jnp.zeros(tokens.shape, bool) if cfg.objective == "bert" else None
  _, state = model_lib.IGPT(cfg).apply(
      {"params": params}, tokens, (max(layers),), "ln1", mask, method=model_lib.IGPT.features,
      capture_intermediates=captured, mutable=["intermediates"])
  got = state["intermediates"]
  parts = [(got["ln_f"] if l == cfg.n_layer else got[f"h_{l}"]["ln_1"])["__call__"][0]
           for l in layers]
  out = sum(p.astype(jnp.float32) for p in parts) / len(parts)
  return nn.with_logical_constraint(out, ("batch", None, None))


def featurizer(cfg: model_lib.IGPTConfig, params, layers: Sequence[int] | None = None,
               reading: str = "ln1", mesh: Mesh | None = None, *, k_masks: int = 0,
               seed: int = 0) -> Callable:
  """fn(tokens int [b, T], index=0) -> {layer: float32 jax.Array [B, F]}, not yet fetched.

  tokens: this process's b rows of a global batch B = b x processes (`local_rows` fetches the
  same rows back). mesh: a `sharding.make_mesh` mesh (default: data parallel over every
  device). The parameters are put in their training layout over it once, here; parameters
  already laid out so (`checkpoint.load(..., mesh=mesh)`) stay where they are. B must divide by
  the mesh's batch shards. index: the batch's number in its pass; the BERT masks of batch
  `index` are drawn from (seed, index), so a pass is reproducible.
  """
  layers = tuple(range(cfg.n_layer + 1) if layers is None else layers)
  model_lib.check_layers(cfg, layers)
  if reading not in model_lib.READINGS:
    raise ValueError(f"reading={reading!r}; expected one of {model_lib.READINGS}")
  mesh = mesh or sharding_lib.make_mesh((-1, 1, 1))
  fn = features_fn(cfg, layers, reading, int(k_masks))
  params = jax.device_put(params, steps_lib.param_shardings(cfg, mesh))
  shards = sharding_lib.batch_shards(mesh)
  base_key = jax.random.key(seed)

  def featurize(tokens, index: int = 0):
    tokens = np.asarray(tokens)
    model_lib.check_tokens(tokens, cfg)
    if (len(tokens) * jax.process_count()) % shards:
      raise ValueError(f"batch of {len(tokens)} rows x {jax.process_count()} processes does "
                       f"not split over the {shards} batch shards of mesh {dict(mesh.shape)}")
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
      return fn(params, sharding_lib.shard_batch({"tokens": tokens}, mesh)["tokens"],
                jax.random.fold_in(base_key, index))

  featurize.mesh = mesh  # extract_features rounds its batch to the mesh
  return featurize


def local_rows(tree):
  """This process's rows of global [B, ...] jax arrays split over the batch axes, as numpy
  (numpy leaves, already local, pass through)."""
  def fetch(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    x = multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, x.sharding.spec)
    return np.asarray(x)
  return jax.tree.map(fetch, tree)


def pipelined(fn: Callable, items: Iterable, fetch: Callable = local_rows):
  """Yields (item, fetch(fn(item))); fn of the next item is dispatched before the current
  result is fetched, so device compute overlaps the copy and the host-side work."""
  pending = None
  for item in items:
    out = fn(item)
    if pending is not None:
      yield pending[0], fetch(pending[1])
    pending = (item, out)
  if pending is not None:
    yield pending[0], fetch(pending[1])


def rows_per_process(batch_size: int, mesh: Mesh) -> int:
  """Each process's share of a global batch of about batch_size rows, rounded up so that the
  global batch splits over the mesh's batch shards."""
  shards, count = sharding_lib.batch_shards(mesh), jax.process_count()
  step = shards // math.gcd(shards, count)
  return -(-(-(-batch_size // count)) // step) * step


def _padded(tokens: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads [b, T] to [size, T] (token 0 is a valid id; the rows are dropped afterwards)."""
  return np.concatenate([tokens, np.zeros((size - len(tokens), tokens.shape[1]), tokens.dtype)])


def extract_features(cfg: model_lib.IGPTConfig, params, tokens, layers=None,
                     batch_size: int = 256, reading: str = "ln1", mesh: Mesh | None = None,
                     k_masks: int = 0) -> dict[int, np.ndarray]:
  """Mean-pooled features of every row of this process's tokens [N, T]: {layer: f32 [N, F]}.

  batch_size is the batch per process, rounded up so the global batch splits over the mesh's
  batch shards (mesh: as `featurizer`); the last batch is padded, so every call compiles once.
  Every process must pass the same N.
  """
  tokens = np.asarray(tokens)
  model_lib.check_tokens(tokens, cfg)
  featurize = featurizer(cfg, params, layers, reading, mesh, k_masks=k_masks)
  batch_size = rows_per_process(batch_size * jax.process_count(), featurize.mesh)
  starts = list(range(0, len(tokens), batch_size))
  chunks = [{l: f[:len(tokens) - start] for l, f in feats.items()} for start, feats in
            pipelined(lambda s: featurize(_padded(tokens[s:s + batch_size], batch_size),
                                          s // batch_size), starts)]
  return {l: np.concatenate([c[l] for c in chunks]) for l in chunks[0]}


def pixel_features(tokens, palette, n_px: int, kind: str = "histogram") -> np.ndarray:
  """Raw-pixel baseline features of tokens [N, T]: float32 [N, F].

  "histogram": fraction of the image's pixels in each palette colour (F = k);
  "rgb": the dequantized image flattened, in [-1, 1] (F = 3 T).
  """
  tokens = np.asarray(tokens)
  palette = palette_lib.check_palette(palette)
  if kind == "histogram":
    k = len(palette)
    counts = np.zeros((len(tokens), k), np.float32)
    np.add.at(counts, (np.arange(len(tokens))[:, None], tokens), 1.0)
    return counts / tokens.shape[1]
  if kind == "rgb":
    rgb = np.asarray(palette_lib.dequantize(tokens, palette, n_px), np.float32)
    return (rgb / 127.5 - 1.0).reshape(len(tokens), -1)
  raise ValueError(f"kind={kind!r}; expected one of {PIXEL_KINDS}")


# -- shards on disk ---------------------------------------------------------------------------

def _name(name) -> str:
  return f"layer{name:02d}" if isinstance(name, (int, np.integer)) else str(name)


def _shard_id(process: int, shard: int) -> str:
  return f"p{process:03d}_s{shard:05d}"


def feature_path(out_dir: paths.PathLike, split: str, name, process: int = 0,
                 shard: int = 0) -> str:
  """Where `write_features` puts shard `shard` of process `process` of feature `name` (a layer
  index or a string: "labels", "pixels_rgb", ...) of a split."""
  return os.fspath(paths.path(out_dir) / split / _name(name) /
                   f"{_shard_id(process, shard)}.npy")


def _marker(out_dir, split: str, process: int, shard: int):
  return paths.path(out_dir) / split / "done" / f"{_shard_id(process, shard)}.json"


def shards(out_dir: paths.PathLike, split: str) -> list[dict]:
  """The complete shards of a split in row order: [{"process", "shard", "rows", "names"}]."""
  done = paths.path(out_dir) / split / "done"
  if not done.exists():
    return []
  return [paths.read_json(p) for p in sorted(done.glob("*.json"))]


def as_float(a: np.ndarray) -> np.ndarray:
  """A stored feature array as a float array: .npy keeps bfloat16 as raw 2-byte records."""
  return a.view(ml_dtypes.bfloat16) if a.dtype.kind == "V" and a.dtype.itemsize == 2 else a


def read_rows(p: paths.PathLike, lo: int, hi: int) -> np.ndarray:
  """Rows [lo, hi) of the 2-D (or 1-D) .npy file p, read by offset through the path layer:
  only those rows' bytes leave the disk or the bucket."""
  with paths.path(p).open("rb") as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                   np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    if fortran:
      raise ValueError(f"{p}: Fortran-ordered arrays are not feature shards")
    row = dtype.itemsize * int(np.prod(shape[1:]))
    hi = min(hi, shape[0])
    f.seek(f.tell() + lo * row)
    data = f.read(max(0, hi - lo) * row)
  return as_float(np.frombuffer(data, dtype).reshape(max(0, hi - lo), *shape[1:]))


def read_shard(out_dir, split: str, names: Sequence, shard: Mapping, lo: int = 0,
               hi: int | None = None) -> np.ndarray:
  """Rows [lo, hi) of features `names` of one shard side by side: [rows, sum F] (one name: as
  stored, float32 or bfloat16; labels int32 [rows])."""
  hi = shard["rows"] if hi is None else hi
  parts = [read_rows(feature_path(out_dir, split, name, shard["process"], shard["shard"]), lo,
                     hi) for name in names]
  if len(parts) == 1:
    return parts[0]
  return np.concatenate([np.asarray(a, np.float32) for a in parts], axis=1)


def feature_dim(out_dir: paths.PathLike, split: str, name) -> int:
  """F of feature `name` of a split (read from its first shard's header)."""
  first = shards(out_dir, split)[0]
  return read_rows(feature_path(out_dir, split, name, first["process"], first["shard"]),
                   0, 0).shape[1]


def load_feature(out_dir: paths.PathLike, split: str, names) -> np.ndarray:
  """Every row of feature `names` (one name, or a list concatenated along F) of a split, in
  memory: [N, sum F] float32, or int32 [N] for "labels"."""
  names = list(names) if isinstance(names, (list, tuple)) else [names]
  found = shards(out_dir, split)
  if not found:
    raise FileNotFoundError(f"no complete feature shards of split {split!r} in {out_dir}")
  dtype = np.int32 if names == ["labels"] else np.float32
  return np.concatenate([np.asarray(read_shard(out_dir, split, names, s), dtype)
                         for s in found])


def _shard_counts(rows: int, batch: int, shard_batches: int) -> int:
  """Shards per process: every process yields the same number of batches (the largest)."""
  most = int(np.max(multihost_utils.process_allgather(np.int64(rows)))) if (
      jax.process_count() > 1) else rows
  return -(-(-(-most // batch)) // shard_batches)


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def feature_set(root: paths.PathLike, role: str, spec: Mapping, names: Sequence[str],
                layout: Mapping) -> tuple[str, dict]:
  """(the split directory under root for these features, the record `write_features` keeps).

  spec: everything the values of the rows depend on (JSON-able: checkpoint, data and split,
  model, reading, dtype, ...); names: the features wanted; layout: how the shards are cut
  (processes, rows per batch, batches per shard), which a resume must match. A complete set of
  the same spec holding every name is reused, whatever its layout; otherwise the set of exactly
  (spec, names, layout), `{role}_{hash}`, where an interrupted run of the same probe resumes.
  Every process must call it before any of them writes (all then agree).
  """
  key, names = _digest(spec), sorted(names)
  root = paths.path(root)
  for info in sorted(root.glob("*/spec.json")) if root.exists() else ():
    held = paths.read_json(info)
    if held.get("key") == key and "rows" in held and set(names) <= set(held["names"]):
      return info.parent.name, held
  record = {"key": key, "spec": dict(spec), "names": names, "layout": dict(layout)}
  return f"{role}_{_digest({k: record[k] for k in ('key', 'names', 'layout')})}", record


def write_features(batches: Iterable[Mapping[str, np.ndarray]],
                   featurize: Callable, out_dir: paths.PathLike, split: str, *, rows: int,
                   shard_batches: int = 64, dtype: str = "float32",
                   on_rows: Callable[[int], object] | None = None,
                   record: Mapping | None = None) -> list[dict]:
  """Streams this process's eval batches through `featurize` into shards of out_dir/split.

  batches: dicts with "tokens" [b, T], "labels" [b] and optionally "valid" [b] (the padded
  last batch of `data.make_dataset(..., train=False)`); every process must yield as many.
  featurize(tokens, index) -> {name: [B, F]} (global jax arrays as `featurizer`'s, fetched to
  this process's rows with `local_rows`, or numpy rows already local). rows: the valid rows
  this process's batches hold (`data.num_examples`); another count is a ValueError. Features
  are stored as `dtype` ("float32" or "bfloat16"), labels as int32. Shards already complete on
  every process are skipped without running featurize (their batches are still read: the
  stream cannot seek). on_rows(n) is called with each batch's number of valid rows (a progress
  bar's update). record (`feature_set`'s): written to {split}/spec.json by process 0 before
  the first shard, and again with the split's total "rows" once every process's shards are
  written (a set with rows is complete). Returns the split's shards (`shards`).
  """
  if dtype not in DTYPES:
    raise ValueError(f"feature dtype {dtype!r}; expected one of {sorted(DTYPES)}")
  batches = iter(batches)
  first = next(batches)
  per_batch = len(first["tokens"])
  n_shards = _shard_counts(rows, per_batch, shard_batches)
  process = jax.process_index()
  done_here = np.array([_complete(_marker(out_dir, split, process, s), dtype)
                        for s in range(n_shards)], bool)
  done = (np.all(multihost_utils.process_allgather(done_here), axis=0)
          if jax.process_count() > 1 else done_here)

  def indexed():  # (index, batch) of the batches whose shard is still to write
    for index, batch in enumerate(_chain(first, batches)):
      if not done[index // shard_batches]:
        yield index, batch
      elif on_rows is not None:
        on_rows(int(_valid(batch).sum()))

  info = paths.path(out_dir) / split / "spec.json"
  if record is not None and process == 0 and not done.all():
    paths.write_json(info, dict(record))
  n = sum(s["rows"] for s in shards(out_dir, split)
          if s["process"] == process and done[s["shard"]])
  buffer, current = {}, None

  def flush(shard: int):
    names = []
    for name, parts in buffer.items():
      paths.save_npy(feature_path(out_dir, split, name, process, shard), np.concatenate(parts))
      names.append(_name(name))
    paths.write_json(_marker(out_dir, split, process, shard),
                     {"process": process, "shard": shard, "dtype": dtype, "names": names,
                      "rows": len(np.concatenate(buffer["labels"])) if buffer else 0})
    buffer.clear()

  for (index, batch), feats in pipelined(lambda ib: featurize(ib[1]["tokens"], ib[0]),
                                         indexed()):
    shard = index // shard_batches
    if current is not None and shard != current:
      flush(current)
    current = shard
    valid = _valid(batch)
    for name, value in {**feats, "labels": np.asarray(batch["labels"], np.int32)}.items():
      value = np.asarray(value)[valid]
      buffer.setdefault(name, []).append(
          value if name == "labels" else value.astype(DTYPES[dtype]))
    n += int(valid.sum())
    if on_rows is not None:
      on_rows(int(valid.sum()))
  if current is not None:
    flush(current)
  if n != rows:
    raise ValueError(f"split {split!r} gave {n} (valid) examples on process {process}, "
                     f"{rows} expected")
  if jax.process_count() > 1:  # every process's markers are written before any reader lists
    multihost_utils.sync_global_devices(f"features of {split} written")
  found = shards(out_dir, split)
  if record is not None and process == 0:
    paths.write_json(info, {**record, "rows": sum(s["rows"] for s in found)})
  return found


def _valid(batch) -> np.ndarray:
  return np.asarray(batch.get("valid", np.ones(len(batch["tokens"]), bool)), bool)


def _complete(marker, dtype: str) -> bool:
  """Whether a shard's marker is there, from an extraction to the same dtype. The names it
  lists are not compared: other layers or readings go to a set of their own (`feature_set`)."""
  return marker.exists() and paths.read_json(marker)["dtype"] == dtype


def _chain(first, rest):
  yield first
  yield from rest
