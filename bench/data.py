"""Images/s of the training input pipeline (decode, augment, quantize, batch), per host core.

  python -m bench.data                                   # local CIFAR-10, cifar augment, batch 64
  taskset -c 0 python -m bench.data --threads 1 --imagenet /work/imagenet_sample  # one core
  python -m bench.data --threads 1 --workdir /tmp/igpt_tiny   # vs the demo run's consumption

CIFAR-10 (--data, --augment) is timed at each of --n_px. With --imagenet (an image folder of
JPEGs, `<root>/train/<class>/*.JPEG`: docs/performance.md says how to lay out the 1,000 public
ImageNet validation images), the `imagenet` augmentation over it is timed at each of
--imagenet_n_px against reading and decoding the same files whole (`tf.io.decode_image`, the
same tf.data threads), alternately for --rounds rounds, best of each kept: `pipeline_over_decode`
is the pipeline's images/s over the decode's.

Each pipeline runs --warmup untimed batches, then --batches timed ones. Per core = images/s /
--threads (the size of tf.data's private thread pool; pin the process to as many cores, e.g.
`taskset -c 0` for one, or other work on the host shares them). Beside the wall-clock rates the
JSON gives `*_per_cpu_s`: images per second of this process's CPU time, which other jobs on a
shared host move much less. The palette's lookup table is built before any timing
(`table_build_s`). The training loop's consumption comes from --consumer_images_per_s, or from a
run's metrics.jsonl (--workdir: median tokens_per_s / demo_n_px**2 over the logged steps). The
last line of stdout is one JSON object.
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
from igpt_jax import images
from igpt_jax import metrics
from igpt_jax import palette as palette_lib

flags.DEFINE_string("data", base.LOCAL_CIFAR10, "dataset name or local path")
flags.DEFINE_string("split", "train[:45000]", "training split")
flags.DEFINE_enum("augment", "cifar", data.AUGMENTS, "augmentation")
flags.DEFINE_list("n_px", ["32", "16"], "resolutions to time (16 = the README demo's)")
flags.DEFINE_string("imagenet", None, "an image folder of JPEGs (its train split) to time")
flags.DEFINE_list("imagenet_n_px", ["32", "48", "64"], "resolutions of the image folder's runs")
flags.DEFINE_integer("rounds", 2, "alternating rounds of the image folder's runs (best kept)")
flags.DEFINE_integer("demo_n_px", 16, "resolution of the demo run that --workdir points to")
flags.DEFINE_integer("batch", 64, "images per batch")
flags.DEFINE_integer("threads", os.cpu_count(), "tf.data thread pool size (host cores used)")
flags.DEFINE_integer("warmup", 3, "untimed batches (graph build, buffer fill)")
flags.DEFINE_integer("batches", 30, "timed batches")
flags.DEFINE_float("consumer_images_per_s", None, "the training step's consumption, if known")
flags.DEFINE_string("workdir", None, "a demo run whose metrics.jsonl gives the consumption")
FLAGS = flags.FLAGS


def timed(batches, images_per_batch: int) -> tuple[float, float]:
  """(images/s, images per CPU-second of this process) over --batches after --warmup."""
  for _ in range(FLAGS.warmup):
    next(batches)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(FLAGS.batches):
    next(batches)
  images = FLAGS.batches * images_per_batch
  return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def pipeline_rate(name: str, augment: str, split: str, n_px: int, palette):
  cfg = dict(name=name, augment=augment, threads=FLAGS.threads)
  return timed(data.make_dataset(cfg, split=split, batch_size=FLAGS.batch, palette=palette,
                                 n_px=n_px, train=True), FLAGS.batch)


def decode_rate(root: str):
  """Reading and decoding the image folder's files whole, in the pipeline's tf.data set-up."""
  tf = images.load_tf()
  files = data._local_split(root, "train")[0]  # pylint: disable=protected-access
  decode = lambda f: tf.shape(tf.io.decode_image(tf.io.read_file(f), channels=3,
                                                 expand_animations=False))
  ds = tf.data.Dataset.from_tensor_slices(files).repeat().map(
      decode, num_parallel_calls=tf.data.AUTOTUNE).batch(FLAGS.batch)
  ds = ds.prefetch(2).with_options(data._options(FLAGS.threads))  # pylint: disable=protected-access
  return timed(ds.as_numpy_iterator(), FLAGS.batch)


def consumer_rate() -> float | None:
  if FLAGS.consumer_images_per_s or not FLAGS.workdir:
    return FLAGS.consumer_images_per_s
  rates = [r["tokens_per_s"] for r in metrics.read(FLAGS.workdir).values() if "tokens_per_s" in r]
  return float(np.median(rates)) / FLAGS.demo_n_px ** 2 if rates else None


def rounded(rates: dict, per: float = 1.0) -> dict:
  return {k: round(v / per, 1) for k, v in rates.items()}


def main(_):
  console.setup()  # as the launch scripts: keeps libtpu from starting on a CPU host
  palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
  load_before = common.load()
  t0 = time.perf_counter()
  palette_lib.nearest_table(palette)
  record = dict(bench="data", data=FLAGS.data, augment=FLAGS.augment, batch=FLAGS.batch,
                threads=FLAGS.threads, host_cores=os.cpu_count(),
                affinity_cores=len(os.sched_getaffinity(0)),
                table_build_s=round(time.perf_counter() - t0, 2))
  wall, cpu = {}, {}
  for n in FLAGS.n_px:
    wall[n], cpu[n] = pipeline_rate(FLAGS.data, FLAGS.augment, FLAGS.split, int(n), palette)
    print(f"{FLAGS.data} n_px {n}: {wall[n]:.0f} images/s, {wall[n] / FLAGS.threads:.0f} per "
          f"core ({FLAGS.threads} threads), {cpu[n]:.0f} per CPU-second", flush=True)
  record.update(images_per_s=rounded(wall), images_per_s_per_core=rounded(wall, FLAGS.threads),
                images_per_cpu_s=rounded(cpu))
  if FLAGS.imagenet:
    best = {}
    for _ in range(FLAGS.rounds):
      for key in ["decode"] + FLAGS.imagenet_n_px:
        rates = (decode_rate(FLAGS.imagenet) if key == "decode" else
                 pipeline_rate(FLAGS.imagenet, "imagenet", "train", int(key), palette))
        best[key] = tuple(max(a, b) for a, b in zip(best.get(key, (0, 0)), rates))
        print(f"{FLAGS.imagenet} {key}: {rates[0]:.0f} images/s, {rates[1]:.0f} per "
              "CPU-second", flush=True)
    (dec_wall, dec_cpu), n_pxs = best.pop("decode"), FLAGS.imagenet_n_px
    files = data._local_split(FLAGS.imagenet, "train")[0]  # pylint: disable=protected-access
    record.update(
        imagenet=FLAGS.imagenet, imagenet_images=len(files), rounds=FLAGS.rounds,
        imagenet_images_per_s=rounded({n: best[n][0] for n in n_pxs}),
        imagenet_images_per_cpu_s=rounded({n: best[n][1] for n in n_pxs}),
        decode_images_per_s=round(dec_wall, 1), decode_images_per_cpu_s=round(dec_cpu, 1),
        pipeline_over_decode={n: round(best[n][0] / dec_wall, 2) for n in n_pxs},
        pipeline_over_decode_cpu={n: round(best[n][1] / dec_cpu, 2) for n in n_pxs})
  record.update(load_before=round(load_before, 2), load_after=round(common.load(), 2))
  consumer = consumer_rate()
  if consumer:
    record.update(consumer_images_per_s=round(consumer, 1), demo_n_px=FLAGS.demo_n_px)
    if str(FLAGS.demo_n_px) in wall:
      record["pipeline_over_consumer"] = round(wall[str(FLAGS.demo_n_px)] / consumer, 2)
  common.emit(record)


if __name__ == "__main__":
  app.run(main)
