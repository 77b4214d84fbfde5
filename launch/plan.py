r"""Plans a run on a TPU slice or GPU hosts from any host, with the real XLA compilers (no device).

  python launch/plan.py --config experiments/igpt_m.py --topology v5p:4x4x2
  python launch/plan.py --config experiments/igpt_m.py --topology h100:8
  python launch/plan.py --config experiments/igpt_l.py --topology v6e:4x8 --slices 2
  python launch/plan.py --config experiments/igpt_xl.py --topology v5p:4x4x4 \
      --programs extract,sample

Topologies: a TPU slice `<v4|v5e|v5p|v6e>:<chips>` (v5e:4x4, v5p:4x4x2, v6e:8x8; `--slices N`
joins N of them over DCN, laid out by `config.dcn_mesh`), or NVIDIA GPUs
`<h100|h200|a100|v100>:<per host>` or `:<hosts>x<per host>` (h100:8, h100:4x8, h200:1; a
bfloat16 config is planned in float16 on a V100, which says so in one line). Compiles each
program of the run (`--programs`, default all: train, eval, extract, sample, finetune; see
igpt_jax/plan.py) on the config's mesh and prints, per program, per-chip memory against the
chip's HBM, the attention it compiled and the compile time; then FLOPs per train step and its
estimated time with the tokens/s and MFU it implies: the TPU compiler's estimate, or on GPUs a
roofline whose assumptions are printed (neither is a measurement); and the images/s each host's
input pipeline must deliver at that step, the host cores it takes (at
--input_images_per_core_s) against the host's vCPUs, with a warning when they are not enough.
Exits 1, with the reason and the knob that helps, when a program does not fit. The last line of
stdout is one JSON object. Needs libtpu for TPUs (`pip install -e '.[tpu]'`), the CUDA compiler
plugin for GPUs (`pip install -e '.[gpu-plan]'`).
"""

import json
import os
import sys

# Eager work stays on the host; the TPU / GPU devices only compile. Must precede the jax import.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=wrong-import-position
from igpt_jax import console

console.setup()  # first, before anything imports jax: see console.setup

from absl import app
from absl import flags
from ml_collections import config_flags

from igpt_jax import plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice (v5p:4x4x2, v5e:4x4) or GPU "
                                "hosts (h100:8, h100:4x8, v100:8).")
_SLICES = flags.DEFINE_integer("slices", 1, "TPU slices of --topology joined over DCN.")
_PROGRAMS = flags.DEFINE_list("programs", list(plan.PROGRAMS),
                              f"Programs to compile, some of {', '.join(plan.PROGRAMS)}.")
_INPUT_RATE = flags.DEFINE_float(
    "input_images_per_core_s", None, "Images/s one host core turns into tokens (bench.data); "
    f"default by resolution {plan.INPUT_IMAGES_PER_CORE_S}, measured on ImageNet JPEGs.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  record = plan.plan(_CONFIG.value, _TOPOLOGY.value, _PROGRAMS.value, _SLICES.value)
  record.update(plan.input_needs(record, _INPUT_RATE.value))
  unit = "GPU" if record["device_kind"].startswith("NVIDIA") else "chip"
  slices = f" x {record['slices']} slices" if record["slices"] > 1 else ""
  print(f"{record['model']} ({record['params'] / 1e6:.0f}M, {record['n_px']}x{record['n_px']}, "
        f"batch {record['batch']}, {record['dtype']}) on {record['topology']}{slices}: "
        f"{record['chips']} {record['device_kind']}, mesh {record['mesh']}, "
        f"{record['hbm_gib']} GiB HBM per {unit}", flush=True)
  if "dtype_note" in record:
    print(f"  {record['dtype_note']}", flush=True)
  for name, rec in record["programs"].items():
    mem = (f"{rec['per_device_gib']:.2f} GiB per {unit} (arguments {rec['argument_gib']:.2f}, "
           f"temporaries {rec['temp_gib']:.2f})" if rec["fits"] else rec["reason"])
    print(f"  {name:9s} {mem}, {rec['attention']} attention, compiled in {rec['compile_s']:.0f} s"
          + (f"\n            {rec['attention_fallback']}" if "attention_fallback" in rec else ""),
          flush=True)
  print(f"fits: {str(record['fits']).lower()}; largest program: {record['largest_program']}",
        flush=True)
  if record["est_step_s"]:
    print(f"train step: {record['flops_per_step'] / 1e12:.1f} TFLOP, estimated "
          f"{record['est_step_s'] * 1e3:.1f} ms, {record['est_tokens_per_s']:.0f} tokens/s, MFU "
          f"{record['est_mfu']:.1%}; estimate: {record['estimate']}", flush=True)
  if "input_images_per_s_per_host" in record:
    host = (f"of the {record['host_cpus']} vCPUs of one {record['host_machine']}"
            if record["host_cpus"] else "(no vCPU count for this machine)")
    print(f"input: {record['input_images_per_s_per_host']} images/s per host (batch "
          f"{record['batch']} over {record['hosts']}), {record['input_cores_per_host']} cores "
          f"at {record['input_images_per_core_s']:.0f} images/s per core, {host}", flush=True)
    if record["input_fits"] is False:
      print(f"WARNING: the input needs {record['input_cores_per_host']} cores per host, more "
            f"than its {record['host_cpus']}: a faster pipeline, a smaller step, or more "
            "hosts", flush=True)
  print(json.dumps(record), flush=True)
  if not record["fits"]:
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
