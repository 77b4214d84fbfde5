"""Images/s of the training input pipeline (decode, augment, quantize, batch), per host core.

  python -m bench.data                                   # local CIFAR-10, cifar augment, batch 64
  python -m bench.data --threads 1 --workdir /tmp/igpt_tiny   # vs the demo run's consumption

Each resolution in --n_px gets its own pipeline; after --warmup batches, --batches are timed.
Per core = images/s / --threads (the size of tf.data's private thread pool). The training loop's
consumption comes from --consumer_images_per_s, or from a run's metrics.jsonl (--workdir: median
tokens_per_s / demo_n_px**2 over the logged steps). The last line of stdout is one JSON object.
"""

from __future__ import annotations

import os
import time

from absl import app, flags
import numpy as np

from bench import common
from experiments import base
from igpt_jax import console
from igpt_jax import data
from igpt_jax import metrics

flags.DEFINE_string("data", base.LOCAL_CIFAR10, "dataset name or local path")
flags.DEFINE_string("split", "train[:45000]", "training split")
flags.DEFINE_enum("augment", "cifar", data.AUGMENTS, "augmentation")
flags.DEFINE_list("n_px", ["32", "16"], "resolutions to time (16 = the README demo's)")
flags.DEFINE_integer("demo_n_px", 16, "resolution of the demo run that --workdir points to")
flags.DEFINE_integer("batch", 64, "images per batch")
flags.DEFINE_integer("threads", os.cpu_count(), "tf.data thread pool size (host cores used)")
flags.DEFINE_integer("warmup", 5, "untimed batches (graph build, buffer fill)")
flags.DEFINE_integer("batches", 50, "timed batches")
flags.DEFINE_float("consumer_images_per_s", None, "the training step's consumption, if known")
flags.DEFINE_string("workdir", None, "a demo run whose metrics.jsonl gives the consumption")
FLAGS = flags.FLAGS


def pipeline_rate(n_px: int, palette) -> float:
  cfg = dict(name=FLAGS.data, augment=FLAGS.augment, threads=FLAGS.threads)
  it = data.make_dataset(cfg, split=FLAGS.split, batch_size=FLAGS.batch, palette=palette,
                         n_px=n_px, train=True)
  for _ in range(FLAGS.warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(it)
  return FLAGS.batches * FLAGS.batch / (time.perf_counter() - t0)


def consumer_rate() -> float | None:
  if FLAGS.consumer_images_per_s or not FLAGS.workdir:
    return FLAGS.consumer_images_per_s
  rates = [r["tokens_per_s"] for r in metrics.read(FLAGS.workdir).values() if "tokens_per_s" in r]
  return float(np.median(rates)) / FLAGS.demo_n_px ** 2 if rates else None


def main(_):
  console.setup()  # as the launch scripts: keeps libtpu from starting on a CPU host
  # Any 512 centres cost the same to search; quantization time does not depend on their values.
  palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
  load_before = common.load()
  rates = {int(n): pipeline_rate(int(n), palette) for n in FLAGS.n_px}
  for n, r in rates.items():
    print(f"n_px {n}: {r:.0f} images/s, {r / FLAGS.threads:.0f} per core ({FLAGS.threads} threads)")
  record = dict(
      bench="data", data=FLAGS.data, augment=FLAGS.augment, batch=FLAGS.batch,
      threads=FLAGS.threads, host_cores=os.cpu_count(),
      images_per_s={n: round(r, 1) for n, r in rates.items()},
      images_per_s_per_core={n: round(r / FLAGS.threads, 1) for n, r in rates.items()},
      load_before=round(load_before, 2), load_after=round(common.load(), 2))
  consumer = consumer_rate()
  if consumer:
    record.update(consumer_images_per_s=round(consumer, 1), demo_n_px=FLAGS.demo_n_px)
    if FLAGS.demo_n_px in rates:
      record["pipeline_over_consumer"] = round(rates[FLAGS.demo_n_px] / consumer, 2)
  common.emit(record)


if __name__ == "__main__":
  app.run(main)
