"""Input pipelines: images -> resize / augment -> palette tokens, in tf.data, per host.

Two kinds of source feed one pipeline:
  * a tfds dataset by name (`KNOWN_TFDS`), read from `data_dir`;
  * a path, local or in a bucket (`gs://...`): an `.npz` file (`images` uint8 [N, H, W, 3],
    `labels` int [N]), a directory of `.npz` files (split `s` = the files `s*.npz`), or an
    image-folder tree (`root/<class>/*` is split "train", or `root/<split>/<class>/*`).
Both take tfds split syntax ("train[:45000]", "train[10%:]", "a+b") and are cut per host with
`tfds.even_splits`, so host i reads its own disjoint slice.

Each example becomes tokens in the graph of `igpt_jax.images`: the window it keeps (centre
square, or the ImageNet augmentation's crop) is chosen from the image's size, a JPEG is decoded
only there, resized, and looked up in the palette's table (`palette.nearest_table`).

An image file that does not decode (truncated, empty, not an image) is found where it is read,
never in a scan ahead. With `skip_bad_files` (the default) it is skipped with one warning per
file, naming it and why, and counted (`skipped_files`): a training batch fills its slot with a
copy of another image of the same batch (the first good one after it), so batch k stays a pure
function of (seed, k) and resumes stay exact; an eval row is left out like a padding row. With
skip_bad_files=False the first such file is a ValueError naming it. (A JPEG cut short still
gives the windows that lie in the part it has.)

Train streams are a pure function of (data_cfg, seed, batch_size, host layout): epoch e is the host
slice shuffled with seed (seed, e), and every random augmentation is a stateless op seeded by
(seed, row of the example in the global stream: batch k's rows are k * batch_size onward, host
i's share of them from i * batch_size / process_count), so no two hosts share a draw. Batch k is
therefore known without running batches 0..k-1, and `start_step=k` resumes exactly there (only
the encoded records of the current epoch are skipped).

TensorFlow is imported lazily (GPU and TPU hosts may lack it) and kept off the accelerators.
Listings, `.npz` files and the palette go through the project's path layer (`igpt_jax.paths`);
TensorFlow reads two kinds of path itself, gs:// included: a tfds `data_dir` (its records) and
the files of an image folder (`tf.io.read_file` inside the pipeline).
"""

from __future__ import annotations

import functools
import io
import os
import re
import threading
from typing import Iterator

from absl import logging
import jax
import numpy as np

from igpt_jax import images as images_lib
from igpt_jax import palette as palette_lib
from igpt_jax import paths

KNOWN_TFDS = ("imagenet2012", "imagenet_resized/32x32", "imagenet_resized/64x64", "cifar10",
              "cifar100", "stl10")
AUGMENTS = ("none", "cifar", "imagenet")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
DEFAULTS = dict(name=None, data_dir=None, train_split="train", eval_split="test", augment="none",
                shuffle_buffer=10_000, threads=0,  # threads 0: one per host core
                skip_bad_files=True)  # see experiments/base.py


_tf = images_lib.load_tf


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _tf()
  return tfds


def _fields(data_cfg) -> dict:
  """data_cfg (ConfigDict or dict) with defaults filled in; typos are errors, not silent."""
  given = dict(data_cfg.items())
  unknown = set(given) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"unknown data config fields {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  cfg = {**DEFAULTS, **given}
  if not cfg["name"]:
    raise ValueError("data config needs `name`: one of "
                     f"{', '.join(KNOWN_TFDS)}, or a local .npz file / directory")
  if cfg["augment"] not in AUGMENTS:
    raise ValueError(f"unknown augment {cfg['augment']!r}; known: {AUGMENTS}")
  return cfg


# ---------------------------------------------------------------------------------------------
# Sources: (dataset of {"image": raw, "label": int}, view) for one split, where view(raw, window)
# -> uint8 [h, w, 3] is the window (y, x, h, w) = window(height, width) of the raw image.


def _is_local(name: str) -> bool:
  """Whether name is a path (local or gs://) rather than a tfds dataset."""
  if name in KNOWN_TFDS:
    return False
  if paths.path(name).exists():
    return True
  raise ValueError(f"unknown dataset {name!r}: not one of the tfds datasets "
                   f"{', '.join(KNOWN_TFDS)}, and no such file or directory")


def _check_arrays(images, labels, where: str):
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{where}: images must be uint8 [N, H, W, 3], got {images.dtype} "
                     f"{images.shape}")
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be int [{len(images)}], got {labels.dtype} "
                     f"{labels.shape}")


def _read_npz(path: str):
  try:
    with np.load(io.BytesIO(paths.path(path).read_bytes())) as f:
      if "images" not in f or "labels" not in f:
        raise ValueError(f"{path}: an .npz source needs arrays `images` and `labels`, "
                         f"found {sorted(f.keys())}")
      images, labels = f["images"], f["labels"]
  except Exception as e:  # pylint: disable=broad-except  # zip, pickle, EOF, OS errors
    if str(e).startswith(path):
      raise
    raise ValueError(f"{path}: not a readable .npz of `images` uint8 [N, H, W, 3] and `labels` "
                     f"int [N] ({type(e).__name__}: {e})") from e
  _check_arrays(images, labels, path)
  return images, labels.astype(np.int32)


def _image_folder(root: str):
  """Files and labels of `root/<class>/*` (classes in sorted order)."""
  classes = sorted(d.name for d in paths.path(root).iterdir() if d.is_dir())
  files, labels = [], []
  for label, cls in enumerate(classes):
    for f in sorted(p.name for p in (paths.path(root) / cls).iterdir()):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.fspath(paths.path(root) / cls / f))
        labels.append(label)
  if not files:
    raise ValueError(f"{root}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in class subdirectories")
  return np.array(files), np.array(labels, np.int32)


@functools.lru_cache(maxsize=2)
def _local_split(path: str, split: str):
  """(images uint8 [N, H, W, 3] or file names [N], labels int32 [N]) of a named local split."""
  root = paths.path(path)
  if not root.is_dir():
    if split != "train":
      raise ValueError(f"{path} is a single .npz file: its only split is 'train' (slice it, "
                       f"e.g. 'train[45000:]'), got {split!r}")
    return _read_npz(path)
  npz = sorted(os.fspath(f) for f in root.glob("*.npz"))
  if npz:
    files = [f for f in npz if paths.path(f).name.startswith(split)]
    if not files:
      raise ValueError(f"{path}: no files {split}*.npz for split {split!r} among "
                       f"{[paths.path(f).name for f in npz]}")
    parts = [_read_npz(f) for f in files]
    if len({p[0].shape[1:] for p in parts}) > 1:
      raise ValueError(f"{path}: the {split!r} files hold images of different sizes")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  if (root / split).is_dir():
    return _image_folder(os.fspath(root / split))
  if split == "train":
    return _image_folder(path)
  raise ValueError(f"{path}: no split {split!r} (no {split}*.npz, no {split}/ folder)")


def _split_names(split: str) -> set[str]:
  return {re.match(r"\s*([\w-]*)", part).group(1) for part in split.split("+")}


def _local_slices(path: str, split: str, index: int, count: int):
  """[(images or files, labels, slice)] of host `index`'s share of a local split spec."""
  tfds = _tfds()
  data = {name: _local_split(path, name) for name in _split_names(split)}
  infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[len(d[1])], num_bytes=0)
           for name, d in data.items()}
  instructions = tfds.even_splits(split, count)[index].to_absolute(infos)
  return [(*data[a.splitname], slice(a.from_, a.to)) for a in instructions]


def _local_source(path: str, split: str, index: int, count: int):
  tf = _tf()
  parts = _local_slices(path, split, index, count)
  images = np.concatenate([images[s] for images, _, s in parts])
  labels = np.concatenate([labels[s] for _, labels, s in parts])
  ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  return ds, (images_lib.array_view if images.dtype == np.uint8 else images_lib.file_view)


def _tfds_source(name: str, data_dir, split: str, index: int, count: int):
  tfds = _tfds()
  if data_dir is not None and not paths.path(data_dir).is_dir():
    raise ValueError(f"data_dir {data_dir!r} for tfds dataset {name!r} does not exist")
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    builder.download_and_prepare()  # a no-op once prepared
  except Exception as e:  # offline, a manual download (ImageNet), a missing dependency, ...
    raise ValueError(f"tfds dataset {name!r} is not prepared in {builder.data_dir} and could not "
                     f"be prepared here ({type(e).__name__}: {e}); prepare it with `tfds build` "
                     "and pass its data_dir") from e
  # Images stay encoded until after the shuffle: smaller buffers, and cheap skips on resume.
  ds = builder.as_dataset(split=tfds.even_splits(split, count)[index], shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
  decode = builder.info.features["image"].decode_example
  return ds, lambda raw, window: images_lib.encoded_view(raw, window, decode)


def _source(cfg: dict, split: str, index: int = 0, count: int = 1):
  """(dataset of {"image", "label"}, view) of host `index`'s share of a split spec."""
  if _is_local(cfg["name"]):
    return _local_source(cfg["name"], split, index, count)
  return _tfds_source(cfg["name"], cfg["data_dir"], split, index, count)


def _host_sizes(cfg: dict, split: str, count: int) -> tuple[int, ...]:
  """Examples of each of `count` hosts' shares of a split (counted once per process)."""
  return _counted_host_sizes(cfg["name"], cfg["data_dir"], split, count)


@functools.cache  # counting reads every host's share: once, not at every evaluation
def _counted_host_sizes(name: str, data_dir: str | None, split: str,
                        count: int) -> tuple[int, ...]:
  if _is_local(name):
    return tuple(sum(len(range(*s.indices(len(labels)))) for _, labels, s in
                     _local_slices(name, split, i, count)) for i in range(count))
  return tuple(int(_tfds_source(name, data_dir, split, i, count)[0].cardinality())
               for i in range(count))


# ---------------------------------------------------------------------------------------------
# Image files that do not decode.

_BAD_FILES: dict[str, str] = {}  # path -> why, for every unreadable file this process met
_BAD_MET: list[str] = []  # the path of each time one was met, in order
_BAD_LOCK = threading.Lock()


def _why_unreadable(path: str) -> str:
  """Why an image file does not decode, in a user's words (PIL tells what TensorFlow does not)."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  try:
    raw = paths.path(path).read_bytes()
  except Exception as e:  # pylint: disable=broad-except
    return f"cannot be read ({type(e).__name__}: {e})"
  if not raw:
    return "empty file (0 bytes)"
  try:
    with Image.open(io.BytesIO(raw)) as image:
      image.load()
  except UnidentifiedImageError:
    return f"not an image ({len(raw)} bytes in no image format PIL knows)"
  except Exception as e:  # pylint: disable=broad-except
    return f"not a decodable image ({len(raw)} bytes; {type(e).__name__}: {e})"
  return f"TensorFlow cannot decode it ({len(raw)} bytes; PIL can: an unusual variant?)"


def _bad_files(files, skip) -> np.ndarray:
  """tf.py_function, run for the image files of a chunk that failed to decode: records each and
  warns once per file when skipping (`_checked` raises otherwise); -> False for each (`ok`)."""
  for path in (f.decode() for f in files.numpy()):
    why = _why_unreadable(path)
    with _BAD_LOCK:
      new = path not in _BAD_FILES
      _BAD_FILES[path] = why
      _BAD_MET.append(path)
    if new and skip.numpy():
      logging.warning("skipping image %s: %s", path, why)
  return np.zeros(len(files), bool)


def skipped_files() -> int:
  """Distinct image files this process's pipelines found unreadable so far (their input runs a
  few batches ahead of the training step)."""
  with _BAD_LOCK:
    return len(_BAD_FILES)


def _mapped(ds, fn, files: bool, skip: bool, flag: str = "ok", chunk: int = 16):
  """ds.map(fn) in order (fn -> dict of tensors), each output with `flag` (bool) added: True.

  Image files (files=True) go through in chunks of `chunk`, each into a dataset that drops the
  examples whose fn fails; the survivors are put back in their places and the failures become
  zeros with `flag` False (after `_bad_files`), so the stream keeps one element per record, in
  order. (A dataset per example would cost about 0.3 ms of a core each.)
  """
  tf = _tf()
  good = lambda *ex: {**fn(*ex), flag: True}
  if not files:
    return ds.map(good, num_parallel_calls=tf.data.AUTOTUNE)

  def guarded(*exs):  # [n <= chunk] examples -> [n] outputs
    kept = tf.data.Dataset.from_tensor_slices(exs).enumerate().map(
        lambda j, ex: (j, good(*ex))).ignore_errors().batch(chunk)
    none = tf.nest.map_structure(  # no survivor: no batch at all, so an empty one
        lambda s: tf.zeros([0] + [d or 1 for d in s.shape[1:]], s.dtype), kept.element_spec)
    j, out = kept.concatenate(tf.data.Dataset.from_tensors(none)).take(1).get_single_element()
    files = exs[-1]["image"]
    ok = tf.reduce_any(tf.range(tf.size(files, out_type=tf.int64))[:, None] == j[None], 1)
    bad = lambda: tf.py_function(_bad_files, [tf.boolean_mask(files, ~ok), skip], tf.bool)
    ok = tf.cond(tf.reduce_all(ok), lambda: ok,
                 lambda: tf.tensor_scatter_nd_update(ok, tf.where(~ok), bad()))
    shape = lambda v: tf.concat([tf.shape(ok, tf.int64), tf.shape(v, tf.int64)[1:]], 0)
    return {**{k: tf.scatter_nd(j[:, None], v, shape(v)) for k, v in out.items() if k != flag},
            flag: ok}

  return ds.batch(chunk).map(guarded, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _checked(batches: Iterator[dict], skip: bool) -> Iterator[dict]:
  """Batches (numpy) after the bad-file policy: without skip, the first unreadable file met is a
  ValueError naming it; with skip, a batch's "ok" [B] is consumed: each row whose image did not
  decode takes a copy of the first good row after it (wrapping around), so a batch keeps its
  size and stays a function of its index."""
  with _BAD_LOCK:
    before = len(_BAD_MET)
  for batch in batches:
    ok = batch.pop("ok", None)
    if not skip and (ok is None or not ok.all()):
      with _BAD_LOCK:  # the pipeline's first bad file, met ahead of (or in) this batch
        path = next(iter(_BAD_MET[before:]), None)
      if path is not None:
        raise ValueError(f"{path}: {_BAD_FILES[path]}; config.data.skip_bad_files=True skips "
                         "such files with a warning")
    if ok is not None and not ok.all():
      good = np.flatnonzero(ok)
      if not len(good):
        raise ValueError(f"every image of a batch of {len(ok)} is unreadable (the warnings "
                         "above name them)")
      rows = good[np.searchsorted(good, np.arange(len(ok))) % len(good)]
      batch = {k: v[rows] for k, v in batch.items()}
    yield batch


def _options(threads: int):
  tf = _tf()
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = threads or os.cpu_count()
  options.threading.max_intra_op_parallelism = 1
  return options


# ---------------------------------------------------------------------------------------------
# Public API.


def make_dataset(data_cfg, *, split: str, batch_size: int, palette, n_px: int, train: bool,
                 seed: int = 0, start_step: int = 0, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
  """This host's batches {"tokens": int32 [B_local, n_px**2], "labels": int32 [B_local]}.

  B_local = batch_size // process_count. train=True: shuffled, augmented, repeated forever,
  starting at batch `start_step` of the stream fixed by (data_cfg, seed). train=False: one pass
  in fixed order without augmentation; the last batch is padded and every batch has
  "valid" bool [B_local]; all hosts yield the same number of batches.
  """
  cfg = _fields(data_cfg)
  palette = palette_lib.check_palette(palette)
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of the "
                     f"{process_count} processes")
  if n_px <= 0:
    raise ValueError(f"n_px must be positive, got {n_px}")
  if start_step < 0 or (start_step and not train):
    raise ValueError(f"start_step {start_step}: must be >= 0, and 0 for eval (one pass)")
  tf = _tf()
  local_batch = batch_size // process_count
  ds, view = _source(cfg, split, process_index, process_count)
  n = int(ds.cardinality())
  if n <= 0:
    raise ValueError(f"split {split!r} of {cfg['name']!r} has no examples on host "
                     f"{process_index} of {process_count}")
  table = tf.constant(palette_lib.nearest_table(palette).reshape(-1))
  files, skip = view is images_lib.file_view, cfg["skip_bad_files"]

  def tokens(ex, seed=None):
    image = images_lib.preprocess(ex["image"], cfg["augment"], n_px, seed, view)
    return {"tokens": tf.reshape(images_lib.quantize(image, table), [n_px * n_px]),
            "labels": tf.cast(ex["label"], tf.int32)}

  if train:
    def epoch(e):  # the host slice in the order of epoch e; a pure function of (seed, e)
      return ds.shuffle(min(cfg["shuffle_buffer"], n), seed=seed * 1_000_003 + e,
                        reshuffle_each_iteration=False)

    first = start_step * local_batch  # position in the stream of this host's next example

    def global_row(i):  # this host's example i is row i % local_batch of its batch i // local_batch
      return i // local_batch * batch_size + process_index * local_batch + i % local_batch

    ds = tf.data.Dataset.range(first // n, 2 ** 62).flat_map(epoch).skip(first % n)
    ds = _mapped(ds.enumerate(start=first),
                 lambda i, ex: tokens(ex, tf.stack([tf.cast(seed, tf.int64), global_row(i)])),
                 files, skip)
    ds = ds.batch(local_batch, drop_remainder=True)
  else:
    padded = -(-max(_host_sizes(cfg, split, process_count)) // local_batch) * local_batch
    ds = _mapped(ds, tokens, files, skip, flag="valid")
    pad = {"tokens": tf.zeros([n_px * n_px], tf.int32), "labels": tf.constant(0, tf.int32),
           "valid": False}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padded - n))
    ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(2).with_options(_options(cfg["threads"]))
  return _checked(ds.as_numpy_iterator(), skip)


def num_examples(data_cfg, split: str) -> int:
  """This host's examples of a split: the valid rows of a `make_dataset(..., train=False)` pass."""
  return _host_sizes(_fields(data_cfg), split, jax.process_count())[jax.process_index()]


def eval_images(images, n_px: int) -> np.ndarray:
  """uint8 [N, n_px, n_px, 3]: arrays uint8 [h, w, 3] of any sizes as evaluation reads images
  (the centre square, area-resized to n_px), e.g. a user's own files to complete."""
  tf = _tf()
  return np.stack([images_lib.preprocess(tf.constant(i, tf.uint8), "none", n_px, None)
                   for i in images])


def load_images(data_cfg, split: str, max_images: int | None = None, *,
                n_px: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, H, W, 3], int32 [N]) of a split, in order, without augmentation (and without
  the image files that do not decode, under skip_bad_files).

  Images of differing sizes (ImageNet, image folders) need `n_px`: each is then cut to its centre
  square and resized to n_px, as the eval pipeline does.
  """
  cfg = _fields(data_cfg)
  tf = _tf()
  ds, view = _source(cfg, split)
  if max_images is not None:
    ds = ds.take(max_images)

  def prepare(ex):
    image = (view(ex["image"], images_lib.whole) if n_px is None else
             images_lib.preprocess(ex["image"], "none", n_px, None, view))
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  # One file at a time: a chunk would batch images of any sizes.
  ds = _mapped(ds, prepare, view is images_lib.file_view, cfg["skip_bad_files"], chunk=1)
  ds = ds.filter(lambda ex: ex["ok"])
  ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
  ds = ds.with_options(_options(cfg["threads"]))
  images, labels = [], []
  for ex in _checked(ds.as_numpy_iterator(), cfg["skip_bad_files"]):
    image, label = ex["image"], ex["label"]
    if images and image.shape != images[0].shape:
      raise ValueError(f"{cfg['name']!r} {split!r} has images of sizes {images[0].shape} and "
                       f"{image.shape}: pass n_px to resize them")
    images.append(image)
    labels.append(label)
  if not images:
    raise ValueError(f"split {split!r} of {cfg['name']!r} is empty")
  return np.stack(images), np.array(labels, np.int32)
