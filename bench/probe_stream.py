"""The streaming SGD probe (`probe.stream_probe`) on synthetic features the size of one ImageNet
layer of iGPT-L: 1,281,167 x 1536 in bfloat16 (3.9 GB) on disk, 1000 classes.

  python -m bench.probe_stream                       # full size (needs ~4.1 GB of disk)
  python -m bench.probe_stream --rows 100000         # smaller

Reports the wall time of each training epoch, the probe's peak resident memory (the process's
high-water mark reset just before the probe, Linux /proc/self/clear_refs, after a warm-up probe
of the same shapes has compiled its programs), the cold read
throughput of the probe's own reader (`probe.read_shard` over every train shard, the files
evicted from the page cache first with posix_fadvise) against a dd-style raw read of the same
files (16 MiB reads, also cold). On a subset that fits in memory (--subset rows of the classes
below --subset_classes, float32), the streaming probe's test accuracy against full-batch L-BFGS
(`probe.linear_probe`) and scikit-learn's SGDClassifier(loss="log_loss") on the same
standardised features at the same L2. The features are Gaussian classes whose means differ by
--separation per dimension (neither trivial nor hopeless). Files are deleted at the end unless
--keep. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import os
import resource
import shutil
import time

from absl import app, flags
import numpy as np

from bench import common
from igpt_jax import console
from igpt_jax import probe
from igpt_jax import sharding

flags.DEFINE_integer("rows", 1_281_167, "train rows (ImageNet's train split)")
flags.DEFINE_integer("test_rows", 50_000, "test rows (ImageNet's validation split)")
flags.DEFINE_integer("dim", 1536, "feature width (iGPT-L)")
flags.DEFINE_integer("classes", 1000, "classes")
flags.DEFINE_float("separation", 0.05, "class means: N(0, separation^2) per dimension")
flags.DEFINE_string("dir", "/tmp/igpt_probe_stream", "where the feature shards are written")
flags.DEFINE_integer("epochs", 1, "timed training epochs")
flags.DEFINE_integer("batch_size", 4096, "SGD minibatch")
flags.DEFINE_integer("chunk_rows", 8192, "rows per read")
flags.DEFINE_float("lr", 0.3, "SGD learning rate (the timed run trains one candidate)")
flags.DEFINE_float("l2", 1e-4, "L2 penalty, all solvers")
flags.DEFINE_integer("subset", 40_000, "accuracy comparison: train rows (of those classes)")
flags.DEFINE_integer("subset_classes", 100, "accuracy comparison: classes kept")
flags.DEFINE_integer("subset_epochs", 10, "accuracy comparison: SGD epochs (both SGDs)")
flags.DEFINE_bool("keep", False, "keep the feature files")
FLAGS = flags.FLAGS

WRITE_BATCH = 8192


def write_split(out_dir, split: str, rows: int, means: np.ndarray, seed: int) -> float:
  """Writes `rows` synthetic rows to bfloat16 shards of 4 x 8192 rows; -> seconds."""
  rng = np.random.default_rng(seed)

  def batches():
    for start in range(0, rows, WRITE_BATCH):
      n = min(WRITE_BATCH, rows - start)
      y = rng.integers(0, len(means), n)
      x = means[y] + rng.standard_normal((n, means.shape[1]), dtype=np.float32)
      yield {"tokens": x, "labels": y.astype(np.int32)}
  start = time.perf_counter()
  with console.progress(desc=f"writing {split}", total=rows, unit="row") as bar:
    probe.write_features(batches(), lambda x, i: {"layer00": x}, out_dir, split, rows=rows,
                         shard_batches=4, dtype="bfloat16", on_rows=bar.update)
  return time.perf_counter() - start


def _files(out_dir, split: str) -> list[str]:
  return [probe.feature_path(out_dir, split, "layer00", s["process"], s["shard"])
          for s in probe.shards(out_dir, split)]


def evict(files) -> None:
  """Drops the files' pages from the page cache, so the next read comes from the disk."""
  for f in files:
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def raw_read_gbps(files) -> float:
  """dd-style: every byte of the files in 16 MiB reads, cold; -> GB/s."""
  evict(files)
  total, start = 0, time.perf_counter()
  for f in files:
    with open(f, "rb", buffering=0) as fh:
      while chunk := fh.read(16 << 20):
        total += len(chunk)
  return total / (time.perf_counter() - start) / 1e9


def reader_gbps(out_dir, chunk_rows: int) -> float:
  """The probe's reader (`probe.read_shard`, chunk_rows at a time) over train, cold."""
  evict(_files(out_dir, "train"))
  total, start = 0, time.perf_counter()
  for shard in probe.shards(out_dir, "train"):
    for lo in range(0, shard["rows"], chunk_rows):
      total += probe.read_shard(out_dir, "train", ["layer00"], shard, lo, lo + chunk_rows).nbytes
  return total / (time.perf_counter() - start) / 1e9


def peak_rss_reset() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def rss_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    line = next(l for l in f if l.startswith(field + ":"))
  return int(line.split()[1]) * 1024


def subset_accuracies(out_dir, mesh) -> dict:
  """Streaming SGD, L-BFGS and scikit-learn (when installed) on the same in-memory subset."""
  sub_dir = os.path.join(out_dir, "subset")
  parts = {}
  for split, rows in (("train", FLAGS.subset), ("test", FLAGS.subset // 4)):
    x, y, got = [], [], 0
    for shard in probe.shards(out_dir, split):
      xs = np.asarray(probe.read_shard(out_dir, split, ["layer00"], shard), np.float32)
      ys = probe.read_shard(out_dir, split, ["labels"], shard)
      keep = ys < FLAGS.subset_classes
      x.append(xs[keep])
      y.append(ys[keep])
      got += int(keep.sum())
      if got >= rows:
        break
    parts[split] = (np.concatenate(x)[:rows], np.concatenate(y)[:rows])
    batches = [{"tokens": parts[split][0][i:i + WRITE_BATCH],
                "labels": parts[split][1][i:i + WRITE_BATCH]}
               for i in range(0, len(parts[split][1]), WRITE_BATCH)]
    probe.write_features(batches, lambda t, i: {"layer00": t}, sub_dir, split,
                         rows=len(parts[split][1]))
  (train_x, train_y), (test_x, test_y) = parts["train"], parts["test"]
  out = {"subset_train": len(train_y), "subset_test": len(test_y),
         "subset_classes": FLAGS.subset_classes, "subset_epochs": FLAGS.subset_epochs}

  start = time.perf_counter()
  ours = probe.stream_probe(sub_dir, ["layer00"], mesh=mesh, lrs=(0.1, 0.3, 1.0),
                            l2s=(FLAGS.l2,), epochs=FLAGS.subset_epochs, batch_size=1024,
                            val_fraction=0.04, n_classes=FLAGS.subset_classes)
  out.update(sgd_accuracy=round(ours["accuracy"], 4), sgd_lr=ours["lr"],
             sgd_seconds=round(time.perf_counter() - start, 1))
  start = time.perf_counter()
  lbfgs = probe.linear_probe(train_x, train_y, test_x, test_y, l2s=(FLAGS.l2,),
                             n_classes=FLAGS.subset_classes)
  out.update(lbfgs_accuracy=round(lbfgs["accuracy"], 4), lbfgs_iterations=lbfgs["iterations"],
             lbfgs_seconds=round(time.perf_counter() - start, 1))
  try:
    from sklearn.linear_model import SGDClassifier  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {**out, "sklearn_sgd": "scikit-learn not installed: column skipped"}
  tx, sx = probe.standardise(train_x, test_x)
  start = time.perf_counter()
  peer = SGDClassifier(loss="log_loss", alpha=FLAGS.l2, max_iter=FLAGS.subset_epochs, tol=None,
                       random_state=0).fit(tx, train_y)
  out.update(sklearn_sgd_accuracy=round(float(peer.score(sx, test_y)), 4),
             sklearn_sgd_seconds=round(time.perf_counter() - start, 1))
  return out


def main(_):
  console.setup()  # as the launch scripts: keeps libtpu from starting on a CPU host
  load_before = common.load()
  out_dir = FLAGS.dir
  shutil.rmtree(out_dir, ignore_errors=True)
  rng = np.random.default_rng(0)
  means = (FLAGS.separation * rng.standard_normal((FLAGS.classes, FLAGS.dim))).astype(np.float32)
  record = dict(bench="probe_stream", device=common.device_name(), rows=FLAGS.rows,
                test_rows=FLAGS.test_rows, dim=FLAGS.dim, classes=FLAGS.classes,
                batch_size=FLAGS.batch_size, chunk_rows=FLAGS.chunk_rows, lr=FLAGS.lr,
                l2=FLAGS.l2)
  try:
    record["write_seconds"] = round(write_split(out_dir, "train", FLAGS.rows, means, 1)
                                    + write_split(out_dir, "test", FLAGS.test_rows, means, 2), 1)
    files = _files(out_dir, "train")
    record["train_bytes"] = sum(os.path.getsize(f) for f in files)
    record["raw_read_gbps"] = round(raw_read_gbps(files), 3)
    record["reader_gbps"] = round(reader_gbps(out_dir, FLAGS.chunk_rows), 3)
    print(f"{record['train_bytes'] / 1e9:.2f} GB of train features; cold reads: raw "
          f"{record['raw_read_gbps']:.2f} GB/s, the probe's reader "
          f"{record['reader_gbps']:.2f} GB/s", flush=True)

    mesh = sharding.make_mesh((-1, 1, 1))
    opts = dict(mesh=mesh, lrs=(FLAGS.lr,), l2s=(FLAGS.l2,), batch_size=FLAGS.batch_size,
                val_fraction=0.04, chunk_rows=FLAGS.chunk_rows, n_classes=FLAGS.classes)
    warm = os.path.join(out_dir, "warm-up")  # compiles the probe's programs before the peak
    for split in ("train", "test"):  # is measured: XLA's compile memory is not the probe's
      write_split(warm, split, 2 * FLAGS.batch_size, means, 3)
    probe.stream_probe(warm, ["layer00"], epochs=1, **opts)
    epochs = []
    rss_before = rss_bytes("VmRSS")
    peak_rss_reset()
    start = time.perf_counter()
    result = probe.stream_probe(out_dir, ["layer00"], epochs=FLAGS.epochs, **opts,
                                on_epoch=lambda e, s: (epochs.append(round(s, 1)),
                                                       print(f"epoch {e}: {s:.1f} s",
                                                             flush=True)))
    record.update(
        epoch_seconds=epochs, probe_seconds=round(time.perf_counter() - start, 1),
        rows_per_s=round(result["n_fit"] / np.mean(epochs)), accuracy=round(result["accuracy"], 4),
        rss_before_gib=round(rss_before / 2**30, 3),
        probe_peak_rss_gib=round(rss_bytes("VmHWM") / 2**30, 3),
        process_peak_rss_gib=round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))
    print(f"peak resident memory during the probe {record['probe_peak_rss_gib']:.2f} GiB "
          f"(before it {record['rss_before_gib']:.2f} GiB)", flush=True)
    record.update(subset_accuracies(out_dir, mesh))
  finally:
    if not FLAGS.keep:
      shutil.rmtree(out_dir, ignore_errors=True)
  record.update(load_before=round(load_before, 2), load_after=round(common.load(), 2))
  common.emit(record)


if __name__ == "__main__":
  app.run(main)
