"""launch/plan.py: the train step compiled for a TPU slice by libtpu's compiler, on this CPU."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="the TPU compiler comes with the tpu extra")

from igpt_jax import model as model_lib  # pylint: disable=wrong-import-position
from igpt_jax import plan  # pylint: disable=wrong-import-position
from igpt_jax import sharding  # pylint: disable=wrong-import-position
from test_train import REPO, TINY, tiny_config  # pylint: disable=wrong-import-position

MODEL = dict(n_px=4, n_layer=3, n_embd=64, n_head=2, vocab_size=16, dtype="bfloat16",
             scan_layers=True)


def test_plan_reports_the_compilers_memory_and_estimate():
  config = tiny_config(("unused.npz", "unused.npy"), model=MODEL, mesh=(2, 2, 1))
  record, compiled = plan.plan_train_step(config, "v5p:2x2x1")
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  assert record["per_device_gib"] == round(total / plan.GIB, 3)
  assert record["temp_gib"] == round(mem.temp_size_in_bytes / plan.GIB, 3)
  assert record["topology"] == "v5p:2x2x1" and record["chips"] == 4
  assert record["device_kind"].startswith("TPU")
  assert record["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert record["fits"] and record["hbm_gib"] == 95
  assert record["attention"] != "auto"  # resolved for the TPU, not for this CPU host
  cfg = model_lib.IGPTConfig(**MODEL)
  assert record["flops_per_step"] == model_lib.flops_per_token(cfg) * 8 * cfg.n_ctx
  assert record["est_step_s"] > 0 and 0 < record["est_mfu"] < 1
  # The scanned step is estimated from unrolled compiles of 1 and 2 blocks, extrapolated to 3:
  # it must agree with the compiler's estimate for the unrolled 3-block step.
  config.model.scan_layers = False
  _, _, lowered = plan.lower_train_step(config, sharding.make_mesh(
      (2, 2, 1), plan.topology_devices("v5p:2x2x1")))
  direct = lowered.compile().cost_analysis()["optimal_seconds"]
  assert record["est_step_s"] == pytest.approx(direct, rel=0.05)


@pytest.mark.slow
def test_too_large_a_step_fails_with_the_reason():
  out = subprocess.run(
      [sys.executable, "launch/plan.py", f"--config={TINY}", "--topology=v5e:2x2",
       "--config.model.n_layer=1", "--config.model.n_embd=16384"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  record = json.loads(out.stdout.splitlines()[-1])
  assert record["fits"] is False and record["per_device_gib"] is None
  assert record["hbm_gib"] == 16 and record["state_gib"] > 16
  assert "RESOURCE_EXHAUSTED" in record["reason"] and "fsdp" in record["reason"]


def test_auto_attention_is_splash_on_tpu_and_compiles_under_the_mesh():
  # 16x16 images: T = 256 fills splash's 128-wide tiles; the kernel runs per device under
  # shard_map, and the one-image init trace must not reach it.
  model = dict(MODEL, n_px=16, n_layer=1, n_embd=256, scan_layers=False)
  config = tiny_config(("unused.npz", "unused.npy"), model=model, mesh=(4, 1, 1))
  record, _ = plan.plan_train_step(config, "v5p:2x2x1")
  assert record["attention"] == "splash" and record["fits"]
