r"""Plans a pretraining run on a TPU slice from any host, with the real TPU compiler (no TPU).

  python launch/plan.py --config experiments/igpt_m.py --topology v5p:4x4x2
  python launch/plan.py --config experiments/igpt_xl.py --topology v5p:4x4x4 \
      --config.model.attention=xla --config.mesh='(1, 32, 2)'

Compiles the config's jitted train step for the slice (`<generation>:<chips>`, e.g. v5e:4x4,
v5p:4x4x2, v6e:8x8) on the config's mesh and prints per-chip memory against the chip's HBM,
the compile time, FLOPs per step and the compiler's estimated step time (an estimate, not a
measurement) with the tokens/s and MFU it implies. Exits 1, with the reason and the knob that
helps, when the step does not fit. The last line of stdout is one JSON object. Needs libtpu
(`pip install -e '.[tpu]'`).
"""

import json
import os
import sys

# Eager work stays on the host; the TPU devices only compile. Must precede the jax import.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `python launch/plan.py` puts launch/ first on the path; configs import their siblings as
# `experiments.*` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from igpt_jax import console  # pylint: disable=wrong-import-position
from igpt_jax import plan  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:4x4x2 or v5e:4x4.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  console.setup()
  record, _ = plan.plan_train_step(_CONFIG.value, _TOPOLOGY.value)
  mem = (f"{record['per_device_gib']:.2f} GiB per chip (state {record['state_gib']:.2f}, "
         f"temporaries {record['temp_gib']:.2f})" if record["fits"] else record["reason"])
  print(f"{record['model']} on {record['topology']} ({record['chips']} chips, mesh "
        f"{record['mesh']}): {mem} of {record['hbm_gib']} GiB HBM, compiled in "
        f"{record['compile_s']:.0f} s", flush=True)
  if record["est_step_s"]:
    print(f"compiler's estimate: {record['est_step_s'] * 1e3:.1f} ms/step, "
          f"{record['est_tokens_per_s']:.0f} tokens/s, MFU {record['est_mfu']:.1%} "
          f"({record['flops_per_step'] / 1e12:.1f} TFLOP per step)", flush=True)
  print(json.dumps(record), flush=True)
  if not record["fits"]:
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
