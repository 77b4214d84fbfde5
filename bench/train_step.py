"""Tokens/s and MFU of the jitted train step (fwd + bwd + Adam), optionally against HF ImageGPT.

  python -m bench.train_step --peer       # reference CPU shape, against transformers
  # GPU (attention "auto" = cuDNN flash in bf16); iGPT-S, iGPT-M, and iGPT-L's compile time:
  python -m bench.train_step --n_layer 24 --n_embd 512 --n_head 8 --batch 32 --dtype bfloat16
  python -m bench.train_step --n_layer 36 --n_embd 1024 --n_head 8 --batch 16 --dtype bfloat16
  python -m bench.train_step --n_layer 48 --n_embd 1536 --n_head 16 --batch 8 --dtype bfloat16 \
      --scan --remat dots --steps 2

MFU = tokens/s * flops_per_token / peak, with flops_per_token = 6 N + 12 L T D (igpt_jax/model.py)
and peak the float32 (or bf16) matmul rate measured in the same run on the same device.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import time

from absl import app, flags
import flax.linen as nn
import jax

from bench import common
from igpt_jax import console
from igpt_jax import sharding
from igpt_jax import steps as steps_lib
from igpt_jax.model import IGPTConfig

flags.DEFINE_integer("n_px", 32, "image side; T = n_px**2")
flags.DEFINE_integer("n_layer", 8, "blocks")
flags.DEFINE_integer("n_embd", 256, "width D")
flags.DEFINE_integer("n_head", 8, "heads")
flags.DEFINE_integer("batch", 8, "images per step")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (params fp32)")
flags.DEFINE_string("attention", "auto", "IGPTConfig.attention")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "IGPTConfig.remat")
flags.DEFINE_bool("scan", False, "IGPTConfig.scan_layers")
flags.DEFINE_integer("steps", 5, "timed steps (after one compile/warm-up step)")
flags.DEFINE_bool("device_per_core", True,
                  "On CPU, one XLA device per core with the batch split over them, as "
                  "launch/train.py runs (the peer uses every core through torch's threads).")
flags.DEFINE_bool("peer", False, "also time HF ImageGPTForCausalImageModeling (the torch CPU "
                  "build: on a GPU box the ratio compares devices)")
FLAGS = flags.FLAGS

LR = 3e-4


def time_ours(cfg, batch, steps):
  """Times `igpt_jax.steps`' real step. -> (s/step, compile + first step s, first, last loss)."""
  mesh = sharding.make_mesh()
  tx = steps_lib.make_optimizer(LR, total_steps=steps + 1, schedule="constant", dtype=cfg.dtype)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    state = steps_lib.create_train_state(cfg, tx, mesh, jax.random.key(0))
    step = steps_lib.make_train_step(steps_lib.loss_fn(cfg), tx,
                                     steps_lib.state_shardings(cfg, tx, mesh))
    batch = sharding.shard_batch({"tokens": common.random_tokens(cfg, batch)}, mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    first = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch)
    last = float(metrics["loss"])  # the only host sync: after the timed loop
  return (time.perf_counter() - t0) / steps, compile_s, first, last


def time_peer(cfg, batch, steps):
  """Seconds per step of HF ImageGPT on CPU (bench/common.hf_peer: dropout off, same shape,
  batch, dtype and random tokens). -> (s/step, settings)."""
  import torch
  model, settings = common.hf_peer(cfg, batch, cfg.dtype)
  model.train()
  opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.95))
  tokens = torch.from_numpy(common.random_tokens(cfg, batch)).long()

  def step():
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  step()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - t0) / steps, settings


def main(_):
  console.setup()  # as the launch scripts: keeps libtpu from starting on a CPU host
  if FLAGS.device_per_core:
    sharding.use_one_cpu_device_per_core(FLAGS.batch)
  cfg = IGPTConfig(n_px=FLAGS.n_px, n_layer=FLAGS.n_layer, n_embd=FLAGS.n_embd,
                   n_head=FLAGS.n_head, dtype=FLAGS.dtype, attention=FLAGS.attention,
                   remat=FLAGS.remat, scan_layers=FLAGS.scan)
  tokens_per_step = FLAGS.batch * cfg.n_ctx
  load_before = common.load()
  peak = common.peak_flops("bfloat16" if FLAGS.dtype == "bfloat16" and
                           jax.default_backend() != "cpu" else "float32")
  sec, compile_s, loss0, loss1 = time_ours(cfg, FLAGS.batch, FLAGS.steps)
  ours = tokens_per_step / sec
  record = dict(
      bench="train_step", device=common.device_name(), n_px=cfg.n_px, n_ctx=cfg.n_ctx,
      n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, batch=FLAGS.batch,
      devices=jax.device_count(), dtype=cfg.dtype, attention=cfg.attention, remat=cfg.remat,
      scan=cfg.scan_layers,
      steps=FLAGS.steps, ours_tokens_per_s=round(ours, 1), step_s=round(sec, 4),
      compile_s=round(compile_s, 2), peak_memory_gib=common.peak_memory_gib(),
      loss_first=round(loss0, 4), loss_last=round(loss1, 4),
      flops_per_token=common.flops_per_token(cfg), peak_flops=int(peak),
      mfu=round(ours * common.flops_per_token(cfg) / peak, 4))
  print(f"ours: {ours:.0f} tokens/s ({sec:.3f} s/step, compile {compile_s:.1f} s, "
        f"MFU {record['mfu']:.1%} of {peak / 1e9:.0f} GFLOP/s)", flush=True)
  if FLAGS.peer:
    peer_sec, settings = time_peer(cfg, FLAGS.batch, FLAGS.steps)
    peer = tokens_per_step / peer_sec
    record.update(settings, peer_tokens_per_s=round(peer, 1), ratio=round(ours / peer, 2),
                  peer_mfu=round(peer * common.flops_per_token(cfg) / peak, 4))
    print(f"peer: {peer:.0f} tokens/s ({settings['peer_attention']} attention, no dropout), "
          f"ratio {ours / peer:.2f}x", flush=True)
  record.update(load_before=round(load_before, 2), load_after=round(common.load(), 2))
  common.emit(record)


if __name__ == "__main__":
  app.run(main)
