"""Sampling throughput: our jitted KV-cache sampler, optionally against Hugging Face's ImageGPT.

  python -m bench.sample                 # ours only, D 256, 8 layers, 8 heads, 32x32, batch 4
  python -m bench.sample --peer          # + ImageGPTForCausalImageModeling.generate, same shape
  python -m bench.sample --device_report # iGPT-S shapes at batch 64 in bf16 (for a GPU)

Both sides draw whole images (n_px**2 tokens per image) from random weights at temperature 1 with
no filtering; compile time is excluded (one warm-up call). The last line is one JSON object.

A decode step reads every matmul weight and the KV cache written so far, whatever the batch, so
at small batch it is bound by memory bandwidth, not FLOPs. The JSON therefore also gives the bytes
one step reads on average (`step_mb`), the traffic our sampler sustains (`ours_gb_per_s`), this
device's streaming read bandwidth (`read_gb_per_s`, a 1 GiB sum) and the tokens/s that
bandwidth would allow if every byte were read once at that speed (`bandwidth_bound_tokens_per_s`).
"""

import os

from absl import app, flags

import jax
import numpy as np

from bench import common
from igpt_jax import console
from igpt_jax import model as model_lib
from igpt_jax import sample as sample_lib
from igpt_jax import sharding

FLAGS = flags.FLAGS
flags.DEFINE_integer("n_px", 32, "Image side: n_px**2 tokens per image.")
flags.DEFINE_integer("n_layer", 8, "Layers.")
flags.DEFINE_integer("n_embd", 256, "Width D.")
flags.DEFINE_integer("n_head", 8, "Heads.")
flags.DEFINE_integer("batch", 4, "Images drawn at once.")
flags.DEFINE_string("dtype", "float32", "Compute dtype of our model.")
flags.DEFINE_integer("repeats", 2, "Timed calls per side (the best one counts).")
flags.DEFINE_bool("device_per_core", True,
                  "On CPU, one XLA device per core with the model split over them "
                  "(sample.host_mesh), as launch/sample.py runs (the peer uses every core "
                  "through torch's threads).")
flags.DEFINE_bool("peer", False, "Also time Hugging Face ImageGPT generate (torch, CPU).")
flags.DEFINE_bool("device_report", False,
                  "iGPT-S (24 layers, D 512, 8 heads, 32x32) at batch 64 in bfloat16: the "
                  "images/s figure for an accelerator. Overrides the shape flags.")


def time_ours(cfg, batch, repeats, mesh):
  params = model_lib.init_params(cfg, jax.random.key(0))
  # The zero-initialised output table would make every draw uniform; real-looking logits.
  params["wtet"] = 0.02 * jax.random.normal(jax.random.key(1), params["wtet"].shape)
  rng = jax.random.key(2)
  draw = lambda: sample_lib.sample(cfg, params, rng, batch_size=batch, mesh=mesh)
  return common.best_seconds(lambda: draw().block_until_ready(), repeats)


def bytes_per_step(cfg, batch):
  """Mean bytes one decode step must bring from memory: the matmul weights plus the KV cache.

  The weights are counted once: on a CPU host the model is split over the devices
  (`sample.host_mesh`), so each reads its share.
  """
  weights = common.matmul_params(cfg) * np.dtype(cfg.param_dtype).itemsize
  per_position = cfg.n_layer * 2 * batch * cfg.n_embd * np.dtype(cfg.dtype).itemsize  # K and V
  lengths = [sample_lib.cache_length(cfg.n_ctx, i) for i in range(1, cfg.n_ctx)]
  return weights + per_position * float(np.mean(lengths))


def time_peer(cfg, batch, repeats):
  """Best seconds of HF ImageGPT generate (bench/common.hf_peer), and the peer's settings."""
  import torch

  peer, settings = common.hf_peer(cfg, batch, cfg.dtype)
  peer.eval()
  # HF keeps the start token as the last vocabulary row.
  start = torch.full((batch, 1), cfg.vocab_size, dtype=torch.long)

  def run():
    with torch.inference_mode():
      out = peer.generate(start, max_length=cfg.n_ctx + 1, do_sample=True, top_k=0,
                          temperature=1.0, use_cache=True, pad_token_id=cfg.vocab_size)
    assert out.shape == (batch, cfg.n_ctx + 1), out.shape

  return common.best_seconds(run, repeats), settings


def main(argv):
  del argv
  console.setup()  # as the launch scripts: keeps libtpu from starting on a CPU host
  if FLAGS.device_per_core:
    sharding.use_one_cpu_device_per_core()
  if FLAGS.device_report:
    cfg = model_lib.preset("igpt_s", dtype="bfloat16")
    batch = 64
  else:
    cfg = model_lib.IGPTConfig(n_px=FLAGS.n_px, n_layer=FLAGS.n_layer, n_embd=FLAGS.n_embd,
                               n_head=FLAGS.n_head, dtype=FLAGS.dtype)
    batch = FLAGS.batch
  tokens = batch * cfg.n_ctx
  load_before = common.load()
  mesh = sample_lib.host_mesh(cfg, batch) if jax.default_backend() == "cpu" else None
  devices = 1 if mesh is None else mesh.size
  ours = time_ours(cfg, batch, FLAGS.repeats, mesh)
  result = dict(bench="sample", device=common.device_name(), n_layer=cfg.n_layer,
                n_embd=cfg.n_embd, n_head=cfg.n_head, n_px=cfg.n_px, batch=batch,
                devices=devices, mesh=dict(mesh.shape) if mesh else None, dtype=cfg.dtype,
                cpu_count=os.cpu_count(),
                ours_seconds=round(ours, 3), ours_tokens_per_s=round(tokens / ours, 1),
                ours_images_per_s=round(batch / ours, 3),
                peak_memory_gib=common.peak_memory_gib())
  step_bytes, read = bytes_per_step(cfg, batch), common.read_bandwidth()
  result.update(step_mb=round(step_bytes / 1e6, 1),
                ours_gb_per_s=round(step_bytes * cfg.n_ctx / ours / 1e9, 1),
                read_gb_per_s=round(read / 1e9, 1),
                bandwidth_bound_tokens_per_s=round(batch * read / step_bytes, 1))
  if FLAGS.peer:
    peer, settings = time_peer(cfg, batch, FLAGS.repeats)
    result.update(settings, peer_sampler="generate(do_sample, top_k 0, temperature 1, cache)",
                  peer_seconds=round(peer, 3), peer_tokens_per_s=round(tokens / peer, 1),
                  ratio=round(peer / ours, 2))
  result.update(load_before=round(load_before, 2), load_after=round(common.load(), 2))
  common.emit(result)


if __name__ == "__main__":
  app.run(main)
