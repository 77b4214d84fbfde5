"""Compiles the iGPT-XL train step ahead of time for a 64-device mesh and reports its memory.

  python -m bench.compile_xl                      # experiments/igpt_xl.py, 64 fake CPU devices
  python -m bench.compile_xl --config experiments/igpt_l.py --devices 32

No accelerator needed: XLA fakes the devices on the host, lowers the sharded, donated step
(`.lower(...).compile()`) and `memory_analysis()` gives what each device would hold. The
compiled CPU program is a stand-in for the TPU/GPU one (same sharding, same buffers; fusion
and layout differ), so read the figure as an estimate. The last line is one JSON object.
"""

import os
import sys

# Must precede the jax import; the device count comes from --devices (default 64).
_DEVICES = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "64")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={_DEVICES}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from bench import common
from igpt_jax import model as model_lib
from igpt_jax import sharding
from igpt_jax import steps

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/igpt_xl.py", "Experiment.")
flags.DEFINE_integer("devices", 64, "Fake host devices (read before jax starts).")

GIB = 2 ** 30


def main(_):
  config = _CONFIG.value
  cfg = model_lib.model_config(config.model)
  mesh = sharding.make_mesh(config.mesh)
  tx = steps.make_optimizer(config.lr, config.total_steps, config.warmup_steps, config.grad_clip)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    state = steps.abstract_train_state(cfg, tx, mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((config.batch_size, cfg.n_ctx), jnp.int32,
                                            sharding=sharding.batch_sharding(mesh))}
    step = steps.make_train_step(steps.loss_fn(cfg), tx, steps.state_shardings(cfg, tx, mesh),
                                 accum_steps=config.accum_steps, seed=config.seed)
    compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  record = dict(
      bench="compile_xl", model=config.model.get("preset", "explicit"), n_px=cfg.n_px,
      params=model_lib.param_count(cfg), batch=config.batch_size, mesh=dict(mesh.shape),
      devices=jax.device_count(), dtype=cfg.dtype, remat=cfg.remat, scan=cfg.scan_layers,
      compile_s=round(compile_s, 1),
      argument_gib=round(mem.argument_size_in_bytes / GIB, 3),
      output_gib=round(mem.output_size_in_bytes / GIB, 3),
      alias_gib=round(mem.alias_size_in_bytes / GIB, 3),
      temp_gib=round(mem.temp_size_in_bytes / GIB, 3),
      per_device_gib=round(per_device / GIB, 3), load=round(common.load(), 2))
  print(f"{record['model']}: {record['params'] / 1e9:.2f}B parameters on mesh "
        f"{record['mesh']}: {record['per_device_gib']:.2f} GiB per device (state "
        f"{record['argument_gib']:.2f}, temporaries {record['temp_gib']:.2f}), compiled in "
        f"{compile_s:.0f} s", flush=True)
  common.emit(record)


if __name__ == "__main__":
  app.run(main)
