"""Features/s of the linear-probe extraction pass (`probe.extract_features`, all layers).

  python -m bench.extract                 # reference CPU shape, against the train step
  python -m bench.extract --n_layer 24 --n_embd 512 --batch 256 --dtype bfloat16 --images 4096

With --vs_train (default) the train step of the same shape and batch is timed in the same run
and `ratio` = extraction tokens/s / train-step tokens/s (no backward, no optimizer: goal >= 3).
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import time

from absl import app, flags
import jax

from bench import common
from bench import train_step
from igpt_jax import console
from igpt_jax import probe
from igpt_jax.model import IGPTConfig, init_params

flags.DEFINE_integer("images", 64, "images per timed pass (a multiple of --batch)")
flags.DEFINE_bool("vs_train", True, "also time the train step (bench.train_step) in this run")
FLAGS = flags.FLAGS  # shape flags (--n_px, --n_layer, ..., --batch) come from bench.train_step


def time_extract(cfg, batch, images):
  """-> (seconds per pass over `images` images, compile + first pass seconds)."""
  params = init_params(cfg, jax.random.key(0))
  tokens = common.random_tokens(cfg, images)
  t0 = time.perf_counter()
  probe.extract_features(cfg, params, tokens, batch_size=batch)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  probe.extract_features(cfg, params, tokens, batch_size=batch)  # returns host numpy: synced
  return time.perf_counter() - t0, compile_s


def main(_):
  console.setup()  # as the launch scripts: keeps libtpu from starting on a CPU host
  cfg = IGPTConfig(n_px=FLAGS.n_px, n_layer=FLAGS.n_layer, n_embd=FLAGS.n_embd,
                   n_head=FLAGS.n_head, dtype=FLAGS.dtype, attention=FLAGS.attention,
                   scan_layers=FLAGS.scan)
  load_before = common.load()
  peak = common.peak_flops("bfloat16" if FLAGS.dtype == "bfloat16" and
                           jax.default_backend() != "cpu" else "float32")
  sec, compile_s = time_extract(cfg, FLAGS.batch, FLAGS.images)
  tokens_per_s = FLAGS.images * cfg.n_ctx / sec
  record = dict(
      bench="extract", device=common.device_name(), n_px=cfg.n_px, n_ctx=cfg.n_ctx,
      n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, batch=FLAGS.batch,
      images=FLAGS.images, dtype=cfg.dtype, attention=cfg.attention, scan=cfg.scan_layers,
      features_per_s=round(FLAGS.images / sec, 2), tokens_per_s=round(tokens_per_s, 1),
      compile_s=round(compile_s, 2), peak_flops=int(peak),
      mfu=round(tokens_per_s * common.flops_per_token(cfg, backward=False) / peak, 4))
  print(f"extract: {FLAGS.images / sec:.1f} images/s, {tokens_per_s:.0f} tokens/s "
        f"(MFU {record['mfu']:.1%})", flush=True)
  if FLAGS.vs_train:
    step_s, _, _, _ = train_step.time_ours(cfg, FLAGS.batch, FLAGS.steps)
    train_tokens_per_s = FLAGS.batch * cfg.n_ctx / step_s
    record.update(train_tokens_per_s=round(train_tokens_per_s, 1),
                  ratio=round(tokens_per_s / train_tokens_per_s, 2))
    print(f"train step: {train_tokens_per_s:.0f} tokens/s, ratio {record['ratio']:.2f}x",
          flush=True)
  record.update(load_before=round(load_before, 2), load_after=round(common.load(), 2))
  common.emit(record)


if __name__ == "__main__":
  app.run(main)
