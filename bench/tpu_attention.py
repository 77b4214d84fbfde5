"""One attention layer (fwd + bwd) compiled for a TPU topology from this host: xla vs splash.

  python -m bench.tpu_attention                                   # iGPT-M 32x32 shapes
  python -m bench.tpu_attention --n_px 64 --heads 24 --batch 64 --topology v5p:4x4x4  # iGPT-XL

Needs libtpu (the `tpu` extra), not a TPU: with JAX_PLATFORMS=cpu the topology's devices are
compile-only. The batch is split over every chip (data x fsdp); per chip, `memory_analysis()`
gives the temporaries and `cost_analysis()` the compiler's estimated time of the layer's
attention. A whole train step is launch/plan.py's job. The last line is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from bench import common
from igpt_jax import attention
from igpt_jax import sharding

flags.DEFINE_string("topology", "v5p:4x4x2", "TPU slice, <gen>:<chips>")
flags.DEFINE_integer("n_px", 32, "image side; T = n_px**2")
flags.DEFINE_integer("batch", 128, "global batch (split over every chip)")
flags.DEFINE_integer("heads", 8, "heads")
flags.DEFINE_integer("head_dim", 128, "head width")
flags.DEFINE_bool("causal", True, "AR (causal) or BERT (full) attention")
FLAGS = flags.FLAGS


def compile_attention(mesh, shape, implementation: str, causal: bool) -> dict:
  """Compiles grad of sum(attention) for bf16 q/k/v [B, T, H, K]; per-chip memory and time."""
  spec = NamedSharding(mesh, P(sharding.BATCH_AXES, None, "tensor", None))
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=spec)

  def loss(q, k, v):
    out = attention.attention(q, k, v, causal=causal, implementation=implementation)
    return jnp.sum(out.astype(jnp.float32))

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):  # splash splits as they say
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return dict(temp_mib=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
              estimated_us=round(cost.get("optimal_seconds", float("nan")) * 1e6, 1))


def main(_):
  devices = topologies.get_topology_desc(topology_name=FLAGS.topology, platform="tpu").devices
  mesh = sharding.make_mesh((-1, 1, 1), devices)
  shape = (FLAGS.batch, FLAGS.n_px**2, FLAGS.heads, FLAGS.head_dim)
  record = dict(bench="tpu_attention", topology=FLAGS.topology, chips=len(devices),
                shape_bthk=list(shape), causal=FLAGS.causal, dtype="bfloat16")
  for impl in ("xla", "splash"):
    result = compile_attention(mesh, shape, impl, FLAGS.causal)
    record.update({f"{impl}_{k}": v for k, v in result.items()})
    print(f"{impl}: {result['temp_mib']} MiB temporaries per chip, "
          f"compiler's estimate {result['estimated_us']} us", flush=True)
  common.emit(record)


if __name__ == "__main__":
  app.run(main)
