"""Optimizer, losses, the training loop's outputs, exact resume, and start-up errors."""

import math
import os
import pathlib
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from igpt_jax import checkpoint
from igpt_jax import goodput
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import steps
from igpt_jax import train
from conftest import STEPS, interrupt, launch, tiny_config


def test_schedule_warms_up_then_decays_to_zero():
  lr = steps.make_schedule(1e-3, total_steps=100, warmup_steps=10)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(55)), 5e-4, rtol=1e-5)  # half-way down the cosine
  assert abs(float(lr(100))) < 1e-12
  const = steps.make_schedule(1e-3, total_steps=100, warmup_steps=10, schedule="constant")
  np.testing.assert_allclose([float(const(s)) for s in (5, 10, 100)], [5e-4, 1e-3, 1e-3],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    steps.make_schedule(1e-3, 10, schedule="linear")


def test_optimizer_is_adam_b2_095_with_clipping():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.array([300.0, 400.0, 0.0])}  # norm 500
  tx = steps.make_optimizer(0.1, total_steps=10, grad_clip=1.0)
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adam(steps.make_schedule(0.1, 10), b1=0.9, b2=0.95))
  s, r = tx.init(params), ref.init(params)
  for _ in range(3):
    u, s = tx.update(grads, s, params)
    v, r = ref.update(grads, r, params)
    np.testing.assert_allclose(u["w"], v["w"], rtol=1e-6)


def test_losses_at_init_and_bert_masking():
  cfg = model_lib.IGPTConfig(n_px=4, n_layer=1, n_embd=16, n_head=2, vocab_size=16)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, cfg.n_ctx), 0, 16)
  rng = jax.random.key(2)
  # The output table starts at zero, so every prediction is uniform.
  np.testing.assert_allclose(steps.example_losses(cfg, params, tokens, rng), math.log(16),
                             rtol=1e-6)
  bert = cfg.replace(objective="bert")
  params = jax.tree.map(lambda p: p + 0.1, model_lib.init_params(bert, jax.random.key(0)))
  mask = model_lib.draw_bert_mask(rng, tokens.shape)
  logits = model_lib.IGPT(bert).apply({"params": params}, tokens, bert_mask=mask)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
  want = [ce[i][mask[i]].mean() for i in range(4)]  # masked positions only, per example
  np.testing.assert_allclose(steps.example_losses(bert, params, tokens, rng), want, rtol=1e-5)
  loss, metrics = steps.loss_fn(bert)(params, {"tokens": tokens}, rng)
  np.testing.assert_allclose(metrics["bits_per_token"], loss / math.log(2), rtol=1e-6)


def test_eval_step_ignores_padding():
  cfg = model_lib.IGPTConfig(n_px=4, n_layer=1, n_embd=16, n_head=2, vocab_size=16)
  params = jax.tree.map(lambda p: p + 0.05, model_lib.init_params(cfg, jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(1), (4, cfg.n_ctx), 0, 16)
  per_example = steps.example_losses(cfg, params, tokens, None)
  valid = jnp.array([True, True, False, False])
  sums = steps.make_eval_step(cfg)(params, {"tokens": tokens, "valid": valid}, None)
  assert float(sums["examples"]) == 2
  np.testing.assert_allclose(sums["loss"], per_example[:2].sum(), rtol=1e-6)
  # By position: the valid rows' token losses, which average to the same loss.
  logits = model_lib.IGPT(cfg).apply({"params": params}, tokens)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # [B, T]
  np.testing.assert_allclose(sums["position_loss"], ce[:2].sum(0), rtol=1e-5)
  np.testing.assert_array_equal(sums["position_count"], np.full(cfg.n_ctx, 2.0))
  np.testing.assert_allclose(sums["position_loss"].sum() / sums["position_count"].sum(),
                             sums["loss"] / sums["examples"], rtol=1e-5)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(files, tmp_path):
  # lr 1e15: the first update is finite but huge, and attention scores overflow soon after.
  config = tiny_config(files, lr=1e15, warmup_steps=0, checkpoint_every=1)
  with pytest.raises(FloatingPointError, match="non-finite") as err:
    train.train_and_evaluate(config, str(tmp_path))
  bad, good = map(int, re.search(r"at step (\d+) .* last good checkpoint is step (\d+)",
                                 str(err.value)).groups())
  assert bad >= 2 and good == bad - 1
  assert checkpoint.manager(str(tmp_path), read_only=True).latest_step() == good
  _, params, _ = checkpoint.load(str(tmp_path))
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=6), "batch_size=6"),
    # 8 devices: microbatches of 16 / 4 = 4 rows would each be gathered whole on every device.
    (dict(batch_size=16, accum_steps=4), r"microbatches of 4 rows \(batch_size=16 / "
                                         r"accum_steps=4\) must divide by the 8 batch shards"),
    (dict(model=dict(n_px=4, n_layers=2, n_embd=32, n_head=2, vocab_size=16)), "n_layers"),
    (dict(model=dict(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=32)), "palette"),
])
def test_bad_config_stops_at_start(files, tmp_path, change, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(files, **change), str(tmp_path))
  assert not checkpoint.manager(str(tmp_path)).all_steps()


def test_bad_data_stops_at_start(files, tmp_path):
  config = tiny_config(files)
  config.data.name = "no_such_dataset"
  with pytest.raises(ValueError, match="unknown dataset"):
    train.train_and_evaluate(config, str(tmp_path))
  np.savez(tmp_path / "gray.npz", images=np.zeros((64, 8, 8), np.uint8),
           labels=np.zeros(64, np.int32))
  config.data.name = str(tmp_path / "gray.npz")
  with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
    train.train_and_evaluate(config, str(tmp_path / "w"))


def corrupt(workdir, step):
  """Truncates the array files of a checkpoint, as a full disk or a copy cut short leaves them."""
  root = pathlib.Path(workdir) / "checkpoints" / str(step)
  arrays = [f for item in ("params", "opt_state") for f in (root / item).rglob("*")
            if f.is_file() and f.parent.name == "d"]
  assert arrays
  for f in arrays:
    os.truncate(f, f.stat().st_size // 2)


@pytest.mark.slow
def test_unreadable_newest_checkpoint_is_skipped(files, tmp_path, caplog):
  # A constant schedule, so a run extended from 20 to 30 steps trains as one of 30 from the start.
  config = lambda total: tiny_config(files, total_steps=total, checkpoint_every=10,
                                     eval_every=0, schedule="constant")
  whole, run = str(tmp_path / "whole"), str(tmp_path / "run")
  train.train_and_evaluate(config(30), whole)
  train.train_and_evaluate(config(20), run)
  corrupt(run, 20)
  with caplog.at_level("WARNING"):
    _, params, _ = checkpoint.load(run)
  assert re.search(r"checkpoints/20 cannot be read, skipping it \(step 20: \w+", caplog.text)
  jax.tree.map(np.testing.assert_array_equal, params, checkpoint.load(run, 10)[1])
  caplog.clear()
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config(30), run)
  assert "checkpoints/20 cannot be read" in caplog.text
  assert "moved unreadable checkpoint 20" in caplog.text
  assert os.path.isdir(tmp_path / "run" / "unreadable_checkpoints" / "20")  # kept, not deleted
  assert checkpoint.manager(run, read_only=True).all_steps() == [10, 20, 30]
  want, got = metrics_lib.read(whole), metrics_lib.read(run)
  np.testing.assert_allclose([got[s]["train_loss"] for s in range(11, 31)],
                             [want[s]["train_loss"] for s in range(11, 31)], rtol=0, atol=1e-6)
  corrupt(run, 30)
  corrupt(run, 20)
  corrupt(run, 10)
  for fn in (checkpoint.load, lambda w: train.train_and_evaluate(config(40), w)):
    with pytest.raises(FileNotFoundError, match="no readable checkpoint .*step 30: .*step 20: .*"
                                                "step 10: "):
      fn(run)
  assert checkpoint.manager(run, read_only=True).all_steps() == [10, 20, 30]  # none moved


@pytest.mark.slow
def test_resume_on_another_data_stream_is_refused_before_any_step(files, tmp_path, caplog):
  config = lambda **kw: tiny_config(files, eval_every=0, sample_every=0, **kw)
  train.train_and_evaluate(config(total_steps=4, checkpoint_every=4), str(tmp_path))
  with pytest.raises(ValueError, match=r"checkpoint .*/checkpoints/4 was trained on another data "
                     r"stream \(batch_size: checkpoint 8, now 16\): resuming would not continue "
                     r"it\. .*--config\.allow_data_change=True"):
    train.train_and_evaluate(config(total_steps=8, batch_size=16), str(tmp_path))
  assert max(metrics_lib.read(tmp_path)) == 4  # not one step on the new stream
  assert checkpoint.steps(str(tmp_path)) == [4]
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config(total_steps=6, batch_size=16, allow_data_change=True),
                             str(tmp_path))
  assert re.search(r"allow_data_change: resuming checkpoint .*/4 on another data stream "
                   r"\(batch_size: checkpoint 8, now 16\), from its batch 4", caplog.text)
  assert checkpoint.read_meta(str(tmp_path))["data"] == {
      "stream": {**checkpoint.read_meta(str(tmp_path), 4)["data"]["stream"], "batch_size": 16},
      "examples_per_host": 6 * 16}


check = train._check_stream  # pylint: disable=protected-access


def test_the_data_stream_check_names_every_change():
  meta = {"step": 9, "data": {"stream": {"batch_size": 8, "seed": 0, "train_split": "train",
                                         "palette": "ab"}}}
  now = {"batch_size": 8, "seed": 1, "train_split": "train[:100]", "palette": "ab"}
  with pytest.raises(ValueError, match=r"\(seed: checkpoint 0, now 1, train_split: checkpoint "
                                       r"'train', now 'train\[:100\]'\)"):
    check(meta, now, "w/9", allow=False)
  check(meta, meta["data"]["stream"], "w/9", allow=False)  # unchanged: no error


def test_a_checkpoint_without_a_data_record_resumes_with_a_warning(caplog):
  with caplog.at_level("WARNING"):
    check({"step": 9}, {"batch_size": 8}, "w/9", allow=False)
  assert "checkpoint w/9 does not record its data stream" in caplog.text


# -- end to end through launch/train.py, with preemption ------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  # The probe evaluator rides along: the resume tests then also show it leaves training alone.
  proc = launch(files, workdir, **{"evals.probe.every": 30,
                                   "evals.probe.train_split": "train[:48]",
                                   "evals.probe.eval_split": "train[48:]"})
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return workdir


@pytest.mark.slow
def test_run_writes_metrics_events_checkpoints_and_samples(uninterrupted):
  metrics = metrics_lib.read(uninterrupted)
  assert sorted(metrics) == list(range(1, STEPS + 1))
  assert all(math.isfinite(r["train_loss"]) for r in metrics.values())
  assert "eval_loss" in metrics[30] and "eval_loss" in metrics[STEPS]
  assert metrics[STEPS]["train_loss"] < math.log(16) - 0.5
  assert [s for s, r in metrics.items() if "probe_accuracy" in r] == [30, STEPS]
  assert all(0 <= metrics[s]["probe_accuracy"] <= 1 for s in (30, STEPS))
  files = os.listdir(uninterrupted)
  assert "probe_vs_loss.png" in files
  assert any(f.startswith("events.out.tfevents") for f in files)
  assert f"samples_{STEPS:07d}.png" in files
  assert {f for f in files if f.startswith("loss_by_pixel")} == {
      "loss_by_pixel_0000030.png", f"loss_by_pixel_{STEPS:07d}.png"}
  # Every row splits its interval by where the time went; the rows and the end record cover
  # the process from its start, and the summary has a cause for every second.
  assert all(f"time_{c}_s" in r for r in metrics.values() for c in goodput.CATEGORIES)
  assert all(0 < r["goodput"] < 1 for r in metrics.values())
  summary = goodput.summarize(goodput.load(uninterrupted))
  [run] = summary["processes"]
  assert run["ended"] and run["last_step"] == STEPS and run["first_step_s"] > 0
  assert abs(summary["unaccounted_s"]) < 0.01 * summary["wall_s"]
  assert summary["steps"]["timed"] == STEPS
  cfg, params, palette = checkpoint.load(str(uninterrupted))
  assert cfg.n_px == 4 and palette.shape == (16, 3)
  assert checkpoint.manager(str(uninterrupted), read_only=True).latest_step() == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_resume_equals_uninterrupted(files, tmp_path, uninterrupted, sig):
  proc = launch(files, tmp_path)
  err = interrupt(proc, tmp_path, sig, after_step=35)
  if sig == signal.SIGTERM:  # saves at the next step boundary and exits cleanly
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: saved step" in err
  else:
    assert proc.returncode == -signal.SIGKILL
  resumed_from = checkpoint.manager(str(tmp_path), read_only=True).latest_step()
  assert 10 <= resumed_from < STEPS
  stream = checkpoint.read_meta(str(tmp_path))["data"]
  assert stream["examples_per_host"] == resumed_from * 8  # tiny batches of 8, one process
  assert {k: stream["stream"][k] for k in ("batch_size", "process_count", "seed", "n_px")} == {
      "batch_size": 8, "process_count": 1, "seed": 0, "n_px": 4}
  proc = launch(files, tmp_path)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert f"resumed from step {resumed_from}" in err

  want, got = metrics_lib.read(uninterrupted), metrics_lib.read(tmp_path)
  after = range(resumed_from + 1, STEPS + 1)
  np.testing.assert_allclose([got[s]["train_loss"] for s in after],
                             [want[s]["train_loss"] for s in after], rtol=0, atol=1e-6)
  # The job's account: the steps the first process trained past its checkpoint were lost
  # (SIGKILL: they are trained again); SIGTERM saved where it stopped, so none were.
  summary = goodput.summarize(goodput.load(tmp_path))
  first, second = summary["processes"]
  assert second["resumed_from"] == resumed_from and second["ended"]
  assert first["ended"] == (sig == signal.SIGTERM)
  assert first["lost_steps"] == first["last_step"] - resumed_from
  assert (summary["badput_s"]["lost"] > 0) == (first["lost_steps"] > 0)
  if sig == signal.SIGTERM:
    assert first["lost_steps"] == 0


@pytest.mark.slow
def test_bfloat16_training_tracks_float32(files, tmp_path):
  """120 steps of the tiny config in bf16 compute (fp32 parameters, norms, softmax, logits and
  loss) and in fp32, the same seeds and batches: the bf16 train loss stays within 0.05 nats
  of fp32 at every logged step, while both fall by more than 1.5 nats (measured: at most 0.034
  apart, 2.6 -> 0.41 nats)."""
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(files, total_steps=120, log_every=10, eval_every=0,
                         checkpoint_every=0, sample_every=0)
    config.model.dtype = dtype
    train.train_and_evaluate(config, str(tmp_path / dtype))
    losses[dtype] = {s: r["train_loss"] for s, r in metrics_lib.read(tmp_path / dtype).items()
                     if "train_loss" in r}
  assert sorted(losses["bfloat16"]) == sorted(losses["float32"]) == list(range(10, 121, 10))
  gaps = {s: abs(losses["bfloat16"][s] - losses["float32"][s]) for s in losses["float32"]}
  assert max(gaps.values()) < 0.05, gaps
  for curve in losses.values():
    assert curve[10] - curve[120] > 1.5
