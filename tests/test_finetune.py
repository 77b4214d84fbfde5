"""Fine-tuning: classifier loss and k-mask predictions; the loop's fine-tuning mode (best
checkpoint on disk, early stop, exact resume after SIGTERM)."""

import json
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from igpt_jax import checkpoint
from igpt_jax import data
from igpt_jax import evaluators
from igpt_jax import finetune
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import sharding
from igpt_jax import steps
from igpt_jax import train
from conftest import interrupt

REPO = pathlib.Path(__file__).resolve().parents[1]

BASE = model_lib.IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=16)


def _separable(n, seed):
  """Class 1 images use the upper half of the palette, class 0 the lower half."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n, dtype=np.int32) % 2
  tokens = rng.integers(0, 8, (n, BASE.n_ctx)) + 8 * labels[:, None]
  return {"tokens": tokens.astype(np.int32), "labels": labels}


def test_with_classifier_adds_a_zero_head():
  cfg, params = finetune.with_classifier(BASE, model_lib.init_params(BASE, jax.random.key(0)), 3)
  assert cfg.n_classes == 3 and not np.any(params["clf"]) and params["clf"].shape == (32, 3)
  with pytest.raises(ValueError, match="n_classes"):
    finetune.with_classifier(BASE, params, 0)


def test_sharded_steps_reduce_classifier_loss():
  cfg, params = finetune.with_classifier(BASE, model_lib.init_params(BASE, jax.random.key(0)), 2)
  mesh = sharding.make_mesh((-1, 1, 1))  # the 8 fake CPU devices
  tx = steps.make_optimizer(1e-2, 10, schedule="constant")
  batch = _separable(16, 0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    shardings = steps.state_shardings(cfg, tx, mesh)
    state = steps.state_from_params(params, tx, shardings)
    step = steps.make_train_step(finetune.loss_fn(cfg), tx, shardings)
    losses = []
    for _ in range(8):
      state, metrics = step(state, sharding.shard_batch(batch, mesh))
      losses.append(float(metrics["clf_loss"]))
    eval_step = finetune.make_eval_step(cfg)
    held_out = _separable(16, 1)
    correct, count = eval_step(state.params, sharding.shard_batch(held_out, mesh),
                               jax.random.key(0))
  assert losses[0] == pytest.approx(np.log(2), rel=1e-4)  # zero head: uniform
  assert losses[-1] < 0.5 * losses[0]
  assert int(count) == 16 and int(correct) >= 14


def test_bert_k_mask_prediction_is_the_modal_class():
  cfg = BASE.replace(objective="bert", n_classes=3)
  params = model_lib.init_params(cfg, jax.random.key(1))
  params["clf"] = jax.random.normal(jax.random.key(2), params["clf"].shape)  # non-trivial head
  tokens = jnp.asarray(_separable(6, 2)["tokens"])
  rng, k = jax.random.key(3), 5
  got = finetune.predict(cfg, params, tokens, rng, k_masks=k)
  per_mask = np.stack([np.argmax(model_lib.IGPT(cfg).apply(
      {"params": params}, tokens, model_lib.draw_bert_mask(key, tokens.shape),
      method=model_lib.IGPT.classify)[1], -1)
      for key in [rng, *jax.random.split(rng, k - 1)]])  # [k, B]: the first mask is rng's
  modal = [np.argmax(np.bincount(col, minlength=3)) for col in per_mask.T]
  np.testing.assert_array_equal(got, modal)
  assert len({tuple(p) for p in per_mask}) > 1  # the masks do change predictions


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A separable labelled .npz of 2x2 images and a (random-init) pretrained run on them."""
  d = tmp_path_factory.mktemp("pretrained")
  separable = _separable(48, 3)
  # 2x2 images whose 4 pixels are the first 4 tokens, in a palette of 16 grey levels.
  palette = np.repeat(np.linspace(-1, 1, 16, dtype=np.float32)[:, None], 3, axis=1)
  images = np.rint(127.5 * (palette[separable["tokens"][:, :4]] + 1)).astype(np.uint8)
  np.savez(d / "tiny.npz", images=images.reshape(48, 2, 2, 3), labels=separable["labels"])
  cfg = BASE.replace(n_px=2)
  checkpoint.save_params(str(d / "pre"), cfg, model_lib.init_params(cfg, jax.random.key(0)),
                         palette)
  return d


def finetune_config(pretrained, **overrides):
  from experiments import finetune_cifar10_tiny  # pylint: disable=import-outside-toplevel
  config = finetune_cifar10_tiny.get_config()
  config.init_workdir = str(pretrained / "pre")
  config.data = dict(name=str(pretrained / "tiny.npz"), train_split="train[:32]",
                     eval_split="train[32:40]", augment="none")
  config.test_split = "train[40:]"
  config.update(dict(n_classes=2, batch_size=8, total_steps=6, eval_every=2, checkpoint_every=2,
                     patience=5, lr=1e-2, log_every=1, keep_checkpoints=1))
  config.update(overrides)
  return config


@pytest.mark.slow
def test_finetune_keeps_the_best_checkpoint_on_disk(pretrained, tmp_path):
  workdir = str(tmp_path / "ft")
  last = train.train_and_evaluate(finetune_config(pretrained), workdir)
  lines = list(metrics_lib.read(tmp_path / "ft").values())
  evals = {l["step"]: l["eval_accuracy"] for l in lines if "eval_accuracy" in l}
  assert sorted(evals) == [2, 4, 6] and all("eval_loss" in l for l in lines if l["step"] in evals)
  assert all("train_loss" in l and "train_clf_loss" in l for l in lines)
  best = max(evals, key=lambda s: (evals[s], -s))  # ties: the earlier step
  assert last["best_step"] == checkpoint.best_step(workdir) == best
  assert last["best_eval_accuracy"] == evals[best]
  # keep_checkpoints=1: the newest, and the best by held-out accuracy whatever its age.
  assert set(checkpoint.manager(workdir, read_only=True).all_steps()) == {best, 6}
  ft_cfg, params, palette = checkpoint.load(workdir, "best")
  assert ft_cfg.n_classes == 2 and params["clf"].shape == (ft_cfg.n_embd, 2)
  config = finetune_config(pretrained)
  mesh = sharding.make_mesh(config.mesh)
  batches = data.make_dataset(config.data, split=config.data.eval_split, batch_size=8,
                              palette=palette, n_px=2, train=False)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = jax.device_put(params, steps.param_shardings(ft_cfg, mesh))
    assert evaluators.held_out_accuracy(ft_cfg, params, batches, mesh, 1, 0) == evals[best]


@pytest.mark.slow
def test_finetune_stops_after_patience(pretrained, tmp_path):
  # lr 0: the accuracy never moves, so the second evaluation has no gain.
  config = finetune_config(pretrained, lr=0.0, total_steps=20, patience=1)
  last = train.train_and_evaluate(config, str(tmp_path))
  assert last["best_step"] == 2
  assert max(metrics_lib.read(tmp_path)) == 4


# -- through launch/finetune.py, with preemption ---------------------------------------------

FT_STEPS = 40


def launch_finetune(pretrained, workdir):
  config = REPO / "experiments" / "finetune_cifar10_tiny.py"
  args = [sys.executable, "-m", "launch.finetune", f"--config={config}", f"--workdir={workdir}",
          f"--config.init_workdir={pretrained / 'pre'}",
          f"--config.data.name={pretrained / 'tiny.npz'}", "--config.data.train_split=train[:32]",
          "--config.data.eval_split=train[32:40]", "--config.data.augment=none",
          "--config.test_split=train[40:]", "--config.n_classes=2", "--config.batch_size=8",
          f"--config.total_steps={FT_STEPS}", "--config.eval_every=10",
          "--config.checkpoint_every=10", "--config.log_every=1", "--config.lr=0.003",
          "--config.patience=0"]
  return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


@pytest.mark.slow
def test_finetune_resumes_exactly_after_sigterm(pretrained, tmp_path):
  whole = tmp_path / "whole"
  out, err = launch_finetune(pretrained, whole).communicate(timeout=600)
  assert "test_accuracy" in json.loads(out.strip().splitlines()[-1]), err[-3000:]
  cut = tmp_path / "cut"
  proc = launch_finetune(pretrained, cut)
  err = interrupt(proc, cut, signal.SIGTERM, after_step=15)
  assert proc.returncode == 0 and "preempted: saved step" in err, err[-3000:]
  resumed_from = checkpoint.manager(str(cut), read_only=True).latest_step()
  assert 15 <= resumed_from < FT_STEPS
  proc = launch_finetune(pretrained, cut)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0 and f"resumed from step {resumed_from}" in err, err[-3000:]
  want, got = metrics_lib.read(whole), metrics_lib.read(cut)
  after = range(resumed_from + 1, FT_STEPS + 1)
  for key in ("train_loss", "train_clf_loss"):
    np.testing.assert_allclose([got[s][key] for s in after], [want[s][key] for s in after],
                               rtol=0, atol=1e-6)
  assert [got[s]["eval_accuracy"] for s in (20, 30, 40)] == [want[s]["eval_accuracy"]
                                                             for s in (20, 30, 40)]
  assert json.load(open(cut / "finetune_results.json")) == json.load(
      open(whole / "finetune_results.json"))
