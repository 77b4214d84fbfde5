"""launch/plan.py: every program of a run compiled for TPU slices (libtpu) and NVIDIA GPUs (the
CUDA plugin's XLA compiler), on this CPU."""

import json
import subprocess
import sys

import jax
import pytest

from igpt_jax import chips
from igpt_jax import model as model_lib
from igpt_jax import plan
from igpt_jax import sharding
from igpt_jax import steps
from conftest import REPO, TINY, tiny_config

MODEL = dict(n_px=4, n_layer=3, n_embd=64, n_head=2, vocab_size=16, dtype="bfloat16",
             scan_layers=True)
UNUSED = ("unused.npz", "unused.npy")


def needs_tpu_compiler():
  pytest.importorskip("libtpu", reason="the TPU compiler comes with the tpu extra")


def needs_gpu_compiler():
  pytest.importorskip("jax_plugins.xla_cuda12",
                      reason="the GPU compiler comes with the gpu-plan extra")


def compiled_total(compiled) -> int:
  mem = compiled.memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)


def test_topology_names_are_checked():
  for bad in ("v9:2x2", "v5p", "tpu:8", "h100:eight"):
    with pytest.raises(ValueError, match="topology"):
      plan.target(bad)
  with pytest.raises(ValueError, match="hosts"):
    plan.target("h100:8", slices=2)


def test_input_needs_give_the_host_cores_that_feed_the_planned_step():
  # iGPT-S on one 8-GPU host: batch 128 in an estimated 19 ms.
  record = dict(topology="h100:8", hosts=1, batch=128, n_px=32, est_step_s=0.019)
  need = plan.input_needs(record, images_per_core_s=400)
  assert need["input_images_per_s_per_host"] == 6737 and need["input_cores_per_host"] == 16.84
  assert need["host_cpus"] == 208 and need["host_machine"] == "a3-highgpu-8g"
  assert need["input_fits"]
  # Each of 8 hosts feeds an eighth of the batch; a step too short for the host's CPUs warns.
  eight = plan.input_needs({**record, "topology": "v5p:4x4x4", "hosts": 8}, 400)
  assert eight["input_cores_per_host"] == 2.11
  assert plan.input_needs({**record, "est_step_s": 0.0001}, 400)["input_fits"] is False
  # The default rate is bench.data's at the nearest resolution; no estimate, no input figures.
  assert plan.input_needs({**record, "n_px": 64})["input_images_per_core_s"] == \
      plan.INPUT_IMAGES_PER_CORE_S[64]
  assert plan.input_needs({**record, "est_step_s": None}) == {}
  unknown = plan.input_needs({**record, "topology": "l4:8"}, 400)  # a GPU HOST_CPUS lacks
  assert unknown["host_cpus"] is None and unknown["input_fits"] is None


@pytest.mark.slow
def test_tpu_plan_compiles_every_program_with_the_compilers_memory_and_estimate():
  needs_tpu_compiler()
  config = tiny_config(UNUSED, model=MODEL, mesh=(2, 2, 1))
  record = plan.plan(config, "v5p:2x2x1")
  assert list(record["programs"]) == list(plan.PROGRAMS)
  assert record["topology"] == "v5p:2x2x1" and record["chips"] == 4 and record["hosts"] == 1
  assert record["device_kind"].startswith("TPU") and record["hbm_gib"] == 95
  assert record["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert record["fits"] and all(r["fits"] for r in record["programs"].values())
  assert record["attention"] != "auto"  # resolved for the TPU, not for this CPU host
  largest = record["programs"][record["largest_program"]]["per_device_gib"]
  assert largest == max(r["per_device_gib"] for r in record["programs"].values())
  mesh = sharding.make_mesh((2, 2, 1), plan.target("v5p:2x2x1").devices)
  _, _, lowered = plan.lower("train", config, mesh)
  assert record["programs"]["train"]["per_device_gib"] == round(
      compiled_total(lowered.compile()) / plan.GIB, 3)
  cfg = model_lib.IGPTConfig(**MODEL)
  assert record["flops_per_step"] == model_lib.flops_per_token(cfg) * 8 * cfg.n_ctx
  assert "TPU compiler" in record["estimate"]
  assert record["est_step_s"] > 0 and 0 < record["est_mfu"] < 1
  # The scanned step is estimated from unrolled compiles of 1 and 2 blocks, extrapolated to 3:
  # it must agree with the compiler's estimate for the unrolled 3-block step.
  config.model.scan_layers = False
  direct = plan.lower("train", config, mesh)[2].compile().cost_analysis()["optimal_seconds"]
  assert record["est_step_s"] == pytest.approx(direct, rel=0.05)


@pytest.mark.slow
def test_gpu_plan_compiles_every_program_with_the_xla_gpu_compiler():
  needs_gpu_compiler()
  config = tiny_config(UNUSED, model=MODEL, mesh=(1, 2, 1))
  record = plan.plan(config, "h100:2")
  assert record["chips"] == 2 and record["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert 79 < record["hbm_gib"] < 80  # the target config's device_memory_size
  assert list(record["programs"]) == list(plan.PROGRAMS) and record["fits"]
  # bf16 picks cuDNN's flash attention, which needs cuDNN at compile time (the extra has it).
  assert {r["attention"] for r in record["programs"].values()} == {"cudnn"}
  mesh = sharding.make_mesh((1, 2, 1), plan.target("h100:2").devices)
  cfg, _, lowered = plan.lower("train", config, mesh)
  compiled = lowered.compile()
  assert record["programs"]["train"]["per_device_gib"] == round(
      compiled_total(compiled) / plan.GIB, 3)
  # The roofline: never faster than the FLOPs at peak or the step's HBM traffic at the
  # memory bandwidth; the fsdp gathers make it slower still.
  assert record["estimate"] == plan.ROOFLINE
  at_peak = record["flops_per_step"] / (2 * chips.CHIPS["h100"].bf16)
  traffic = record["hbm_gib_per_step"] * plan.GIB / plan.target("h100:2").hbm_bytes_per_s
  assert record["est_step_s"] > max(at_peak, traffic) and 0 < record["est_mfu"] < 1
  # The scanned step's traffic, extrapolated from unrolled 1- and 2-block compiles, is the
  # unrolled 3-block step's.
  extrapolated = plan.train_step_bytes(config, cfg, mesh, compiled)
  assert record["hbm_gib_per_step"] == round(extrapolated / plan.GIB, 3)
  config.model.scan_layers = False
  direct = plan.hbm_bytes(plan.lower("train", config, mesh)[2].compile())
  assert extrapolated == pytest.approx(direct, rel=0.05)


@pytest.mark.slow
def test_a_multi_axis_v6e_layout_splits_physical_axes_and_compiles():
  needs_tpu_compiler()
  devices = plan.target("v6e:4x8").devices
  with pytest.raises(Exception):  # what sharding.make_mesh replaced: no split axes off v5e
    jax.make_mesh((2, 8, 2), sharding.MESH_AXES, devices=devices)
  config = tiny_config(UNUSED, model=MODEL, mesh=(2, 8, 2), batch_size=32)
  record = plan.plan(config, "v6e:4x8", programs=("train",))
  assert record["mesh"] == {"data": 2, "fsdp": 8, "tensor": 2} and record["fits"]


@pytest.mark.slow
def test_two_slices_put_the_data_axis_across_them():
  needs_tpu_compiler()
  devices = plan.target("v5e:2x2", slices=2).devices
  mesh = sharding.make_mesh((1, 2, 2), devices)  # dcn_shape (-1, 1, 1): data over the slices
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  slice_of = [[d.slice_index for d in m.flat] for m in mesh.devices]
  assert slice_of == [[0] * 4, [1] * 4]  # each data index is one whole slice
  config = tiny_config(UNUSED, model=MODEL, mesh=(1, 2, 2))
  record = plan.plan(config, "v5e:2x2", programs=("train",), slices=2)
  assert record["chips"] == 8 and record["slices"] == 2 and record["fits"]
  with pytest.raises(ValueError, match="dcn_mesh"):
    sharding.make_mesh((1, 2, 2), devices, dcn_shape=(1, 1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("n_px", [16, 48])
def test_auto_attention_is_splash_on_tpu_and_compiles_under_the_mesh(n_px):
  needs_tpu_compiler()
  # T = 256 fills splash's 128-wide tiles; T = 2304 (48x48) takes tiles of 384, since 512
  # does not divide it. The kernel runs per device under shard_map, and the one-image init
  # trace must not reach it.
  model = dict(MODEL, n_px=n_px, n_layer=1, n_embd=256, scan_layers=False)
  config = tiny_config(UNUSED, model=model, mesh=(4, 1, 1))
  record = plan.plan(config, "v5p:2x2x1", programs=("train", "extract"))
  assert record["attention"] == "splash" and record["fits"]


def run_plan(*flags):
  out = subprocess.run([sys.executable, "launch/plan.py", f"--config={TINY}", *flags],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
  return out, (json.loads(out.stdout.splitlines()[-1]) if out.stdout else None)


@pytest.mark.slow
@pytest.mark.parametrize("topology,hbm", [("v5e:2x2", 16), ("h100:2", 79.11)])
def test_too_large_a_step_fails_with_the_reason_and_its_knob(topology, hbm):
  (needs_gpu_compiler if topology.startswith("h") else needs_tpu_compiler)()
  # 12 x 32768^2 parameters: 206 GB of fp32 state over 2 or 4 chips.
  out, record = run_plan(f"--topology={topology}", "--programs=train",
                         "--config.model.n_layer=1", "--config.model.n_embd=32768",
                         "--config.model.n_head=64", "--config.mesh=(1, -1, 1)")
  assert out.returncode == 1, out.stderr[-3000:]
  assert record["fits"] is False and record["hbm_gib"] == hbm
  assert record["programs"]["train"]["argument_gib"] > hbm / 2  # the state is the culprit
  assert "fsdp" in record["reason"] and record["largest_program"] == "train"
  assert "fits: false" in out.stdout


@pytest.mark.slow
def test_gpu_plans_pick_the_attention_and_dtype_each_gpu_runs():
  """Deviceless, as a user plans: on an A100 (compute capability 8.0) "auto" compiles cuDNN's
  flash attention in bf16; on a V100 (7.0), where cuDNN's has no kernel (yet its compile goes
  through without the GPU), XLA's, and the bf16 config is planned in float16 with its loss
  scale (the V100 has no bf16 tensor cores), said in one line."""
  needs_gpu_compiler()
  config = tiny_config(UNUSED, model=MODEL, mesh=(2, 1, 1))
  a100 = plan.plan(config, "a100:2", programs=("train",))
  assert a100["attention"] == "cudnn" and a100["dtype"] == "bfloat16"
  assert "dtype_note" not in a100 and "attention_fallback" not in a100["programs"]["train"]
  v100 = plan.plan(config, "v100:2", programs=("train", "sample"))
  assert v100["device_kind"] == "Tesla V100-SXM2-16GB" and v100["fits"]
  assert v100["attention"] == "xla" and v100["dtype"] == "float16"
  assert all(r["attention"] == "xla" and "attention_fallback" not in r
             for r in v100["programs"].values())
  assert "\n" not in v100["dtype_note"] and "float16" in v100["dtype_note"]
  fp16, _ = plan.dtype_for(config, plan.target("v100:2"))
  mesh = sharding.make_mesh((2, 1, 1), plan.target("v100:2").devices)
  _, (state, _), _ = plan.lower("train", fp16, mesh)
  assert isinstance(state.opt_state, steps.LossScaleState)
