"""Probe: extraction over a mesh (parameters replicated or split), the L-BFGS logistic regression
against scikit-learn, the tables."""

import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from experiments import probe_cifar10_tiny as probe_tiny
from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import model as model_lib
from igpt_jax import probe
from igpt_jax import sharding
from igpt_jax import steps
from conftest import labelled_images

CFG = model_lib.IGPTConfig(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=16)


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(CFG, jax.random.key(0))


def _tokens(n, seed=0):
  return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, CFG.n_ctx), np.int32)


def test_extraction_on_8_devices_equals_1_device(params):
  assert len(jax.local_devices()) == 8  # conftest fakes 8 CPU devices
  tokens = _tokens(21)  # not a multiple of the batch: the last batch is padded
  many = probe.extract_features(CFG, params, tokens, batch_size=16)
  one = probe.extract_features(CFG, params, tokens, batch_size=16,
                               mesh=sharding.make_mesh((1, 1, 1), jax.local_devices()[:1]))
  # Parameters split as training lays them out (embed over fsdp, heads over tensor), as
  # checkpoint.load(..., mesh=) restores them for models too big for one chip.
  mesh = sharding.make_mesh((1, 4, 2))
  split = jax.device_put(params, steps.param_shardings(CFG, mesh))
  assert not split["wte"].sharding.is_fully_replicated
  fsdp = probe.extract_features(CFG, split, tokens, batch_size=16, mesh=mesh)
  assert sorted(many) == list(range(CFG.n_layer + 1))
  for layer in many:
    assert many[layer].shape == (21, CFG.n_embd)
    np.testing.assert_allclose(many[layer], one[layer], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fsdp[layer], one[layer], rtol=1e-5, atol=1e-6)
  direct = model_lib.IGPT(CFG).apply({"params": params}, tokens[:5], [1], "residual",
                                     method=model_lib.IGPT.features)[1]
  np.testing.assert_allclose(
      probe.extract_features(CFG, params, tokens[:5], [1], 8, reading="residual")[1],
      direct, rtol=1e-5, atol=1e-6)


def test_extraction_rejects_bad_layers(params):
  with pytest.raises(ValueError, match="out of range"):
    probe.extract_features(CFG, params, _tokens(4), layers=[CFG.n_layer + 1])


def test_write_features_streams_valid_rows(params, tmp_path):
  tokens, labels = _tokens(12), np.arange(12, dtype=np.int32) % 3
  valid = np.arange(16) < 12
  batches = [{"tokens": np.concatenate([tokens, tokens[:4]])[i:i + 8],
              "labels": np.concatenate([labels, labels[:4]])[i:i + 8],
              "valid": valid[i:i + 8]} for i in (0, 8)]
  featurize = probe.featurizer(CFG, params, [0, 2])
  shards = probe.write_features(batches, featurize, str(tmp_path), "test", rows=12,
                                shard_batches=1)
  assert [(s["shard"], s["rows"]) for s in shards] == [(0, 8), (1, 4)]
  assert set(shards[0]["names"]) == {"layer00", "layer02", "labels"}
  assert os.path.exists(probe.feature_path(str(tmp_path), "test", 2, 0, 1))
  np.testing.assert_array_equal(probe.load_feature(str(tmp_path), "test", "labels"), labels)
  want = probe.extract_features(CFG, params, tokens, [0, 2], batch_size=8)
  for layer in (0, 2):
    np.testing.assert_allclose(probe.load_feature(str(tmp_path), "test", f"layer{layer:02d}"),
                               want[layer], rtol=1e-5, atol=1e-6)


def _blobs(n, seed, n_classes=3, dim=6):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(0, 1.0, (n_classes, dim))
  y = rng.integers(0, n_classes, n)
  return (centres[y] + rng.normal(0, 1.2, (n, dim))).astype(np.float32), y.astype(np.int32)


def test_linear_probe_agrees_with_sklearn():
  train_x, train_y = _blobs(200, 0)
  test_x, test_y = _blobs(100, 1)
  l2 = 1e-2
  ours = probe.linear_probe(train_x, train_y, test_x, test_y, l2s=[l2])
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  sk = LogisticRegression(C=1.0 / (l2 * len(train_x)), max_iter=1000, tol=1e-8)
  sk.fit((train_x - mean) / std, train_y)
  sk_acc = sk.score((test_x - mean) / std, test_y)
  assert 0.5 < ours["accuracy"] < 1.0  # a non-trivial problem
  assert abs(ours["accuracy"] - sk_acc) <= 0.005
  assert ours["l2"] == l2 and ours["iterations"] > 1


def test_warm_start_reaches_the_same_optimum_in_fewer_iterations():
  x, y = _blobs(200, 4)
  x = (x - x.mean(0)) / x.std(0)
  near, _ = probe.fit_logistic(x, y, 1e-1, 3, tol=1e-7)
  cold, cold_it = probe.fit_logistic(x, y, 1e-2, 3, tol=1e-7)
  warm, warm_it = probe.fit_logistic(x, y, 1e-2, 3, tol=1e-7, init=near)
  np.testing.assert_allclose(warm["w"], cold["w"], atol=1e-4)
  assert 0 < warm_it < cold_it


def test_linear_probe_sweep_picks_from_validation():
  train_x, train_y = _blobs(200, 2)
  test_x, test_y = _blobs(100, 3)
  out = probe.linear_probe(train_x, train_y, test_x, test_y, l2s=[1e-3, 1e-1, 30.0])
  assert set(out["val_accuracy"]) == set(out["val_loss"]) == {1e-3, 1e-1, 30.0}
  assert out["val_loss"][out["l2"]] == min(out["val_loss"].values())
  assert out["l2"] != 30.0  # the penalty that flattens the blobs' logits is never least CE
  with pytest.raises(ValueError, match=r"\[N, F\]"):
    probe.linear_probe(train_x, train_y, test_x[:, :2], test_y)


def test_tables_and_low_data(tmp_path):
  data = {l: (*_blobs(200, 10 + l), *_blobs(100, 20 + l)) for l in range(3)}

  def fit(layers):  # the features of `layers` side by side, as run() probes them
    parts = [data[l] for l in layers]
    return probe.linear_probe(np.concatenate([p[0] for p in parts], 1), parts[0][1],
                              np.concatenate([p[2] for p in parts], 1), parts[0][3], l2s=[1e-2])
  table = probe.probe_layers(fit, range(3))
  assert table["best_layer"] == min(range(3), key=lambda l: table["layers"][l]["chosen_val_loss"])
  assert table["best_accuracy"] == table["layers"][table["best_layer"]]["accuracy"]
  concat = probe.concat_layers(fit, center=2, k=2, layers=range(3))
  assert concat["layers"] == [1, 2]
  assert probe.concat_window(30, 5, range(15, 46)) == [28, 29, 30, 31, 32]
  assert probe.concat_window(45, 5, range(15, 46)) == [41, 42, 43, 44, 45]
  low = probe.low_data_probe(*data[0], sizes=(6, 30), seeds=2, l2s=[1e-2])
  assert set(low) == {6, 30} and len(low[6]["accuracies"]) == 2
  assert low[6]["std"] == np.std(low[6]["accuracies"])
  idx = probe.label_subset(data[0][1], 30, seed=0)
  assert np.bincount(data[0][1][idx]).tolist() == [10, 10, 10]
  probe.plot_accuracy(str(tmp_path / "acc.png"), {"model": {0: .3, 1: .5, 2: .4}}, {"pixels": .35})
  assert (tmp_path / "acc.png").stat().st_size > 1000
  probe.write_json(str(tmp_path / "r.json"), table)
  assert json.load(open(tmp_path / "r.json"))["best_layer"] == table["best_layer"]


def test_best_layer_is_chosen_on_validation_not_on_test():
  # Layer 1 scores best on test, layer 2 on the rows held out of train: the table picks 2 and
  # reports its test accuracy; the concatenation centres on it.
  records = {0: dict(accuracy=.30, chosen_val_loss=2.0, chosen_val_accuracy=.25),
             1: dict(accuracy=.50, chosen_val_loss=1.8, chosen_val_accuracy=.40),
             2: dict(accuracy=.45, chosen_val_loss=1.7, chosen_val_accuracy=.35)}
  table = probe.probe_layers(lambda names: records[names[0]], range(3))
  assert (table["best_layer"], table["best_layer_by"], table["best_accuracy"]) == (
      2, "val_loss", .45)
  assert probe.probe_layers(lambda names: records[names[0]], range(3),
                            "val_accuracy")["best_layer"] == 1
  assert probe.concat_window(table["best_layer"], 2, range(3)) == [1, 2]
  with pytest.raises(ValueError, match="best_layer_by='test'"):
    probe.best_layer(records, "test")
  # A probe of one l2 is validated too, so that layers probed so can be ranked.
  x, y = _blobs(100, 5)
  one = probe.linear_probe(x, y, x, y, l2s=[1e-2])
  assert one["chosen_val_loss"] == one["val_loss"][1e-2] > 0


def test_pixel_histograms_sum_to_one_and_rgb_has_three_values_per_pixel():
  pal = np.linspace(-1, 1, 16 * 3, dtype=np.float32).reshape(16, 3)
  tokens = _tokens(3)
  hist = probe.pixel_features(tokens, pal, CFG.n_px)
  np.testing.assert_allclose(hist.sum(1), 1.0)
  assert hist[0, tokens[0, 0]] >= 1 / CFG.n_ctx
  assert probe.pixel_features(tokens, pal, CFG.n_px, "rgb").shape == (3, CFG.n_ctx * 3)
  with pytest.raises(ValueError, match="kind"):
    probe.pixel_features(tokens, pal, CFG.n_px, "hog")


@pytest.fixture(scope="module")
def run_dir(params, tmp_path_factory):
  """A weights-only checkpoint of CFG and a tiny labelled .npz of 8x8 images (4 classes)."""
  root = tmp_path_factory.mktemp("probe_run")
  images, labels = labelled_images(48, 8)
  np.savez(root / "tiny.npz", images=images, labels=labels)
  np.savez(root / "unlabelled.npz", images=images, labels=np.full(48, -1, np.int32))
  palette = np.random.default_rng(1).uniform(-1, 1, (CFG.vocab_size, 3)).astype(np.float32)
  ckpt_lib.save_params(str(root / "run"), CFG, params, palette)
  return root


def _probe_config(root, **overrides):
  config = probe_tiny.get_config()
  config.data = dict(name=str(root / "tiny.npz"), train_split="train[:32]",
                     eval_split="train[32:]")
  config.batch_size = 8
  config.l2s = (1e-2, 1e-1)
  config.low_data = dict(sizes=(8,), seeds=2, balanced=True)
  config.update(overrides)
  return config


@pytest.mark.slow
def test_run_writes_results_plot_and_baselines(run_dir):
  results = probe.run(_probe_config(run_dir), str(run_dir / "run"), baselines=True)
  out = run_dir / "run" / "probe"
  saved = json.load(open(out / "results.json"))
  assert saved["summary"] == json.loads(json.dumps(results["summary"]))
  assert set(saved["summary"]) == {"best_layer", "best_layer_by", "pretrained", "concat",
                                   "random_init", "pixels_histogram", "pixels_rgb"}
  assert saved["summary"]["best_layer_by"] == saved["pretrained"]["best_layer_by"] == "val_loss"
  assert len(saved["pretrained"]["layers"]) == CFG.n_layer + 1
  assert (saved["n_train"], saved["n_test"]) == (32, 16)
  assert (out / "accuracy_by_layer.png").stat().st_size > 1000
  feat_dir, sets = probe.feature_sets(out)
  feats = probe.load_feature(feat_dir, sets["test"], "layer01")
  assert feats.shape == (16, 4 * CFG.n_embd)  # the demo config reads quadrant means
  assert probe.load_feature(feat_dir, sets["train"], "pixels_histogram").shape == (
      32, CFG.vocab_size)
  assert {r["solver"] for r in saved["pretrained"]["layers"].values()} == {"lbfgs"}


@pytest.mark.slow
def test_probe_reruns_with_another_split_then_other_layers_on_one_workdir(run_dir, tmp_path):
  """The README's row 2 then row 3 (another train split) on one workdir, then other layers: each
  probe extracts only the sets it lacks, beside the others, and reuses the rest."""
  out = tmp_path / "probe"
  small = dict(concat_k=1, low_data=dict(sizes=(), seeds=1, balanced=True))
  first = probe.run(_probe_config(run_dir, **small), str(run_dir / "run"), out_dir=str(out))
  feat_dir = out / "features"
  stamps = lambda: {p: p.stat().st_mtime_ns for p in feat_dir.rglob("*.npy")}
  before = stamps()
  config = _probe_config(run_dir, **small)
  config.data.train_split = "train[:24]"
  second = probe.run(config, str(run_dir / "run"), out_dir=str(out))
  assert (second["n_train"], second["n_test"]) == (24, 16)
  assert {p: t for p, t in stamps().items() if p in before} == before  # nothing rewritten
  assert second["features"]["test"] == first["features"]["test"]  # the same test set, reused
  assert second["features"]["train"] != first["features"]["train"]
  third = probe.run(_probe_config(run_dir, layers=(0, 2), **small), str(run_dir / "run"),
                    out_dir=str(out))
  assert sorted(third["pretrained"]["layers"]) == [0, 2]
  assert third["features"] == first["features"]  # layers 0 and 2 are in the first sets
  # Their probes equal the first run's: the same features, read from the same files.
  for l in (0, 2):
    assert third["pretrained"]["layers"][l] == first["pretrained"]["layers"][l]
  residual = _probe_config(run_dir, layers=(1,), reading="residual", **small)
  fourth = probe.run(residual, str(run_dir / "run"), out_dir=str(out))  # another reading
  assert set(fourth["features"].values()).isdisjoint(first["features"].values())
  held = {p.parent.name: json.load(open(p)) for p in feat_dir.glob("*/spec.json")}
  assert len(held) == 5 and all("rows" in h for h in held.values())
  assert held[second["features"]["train"]]["spec"]["split"] == "train[:24]"
  # The same command from scratch elsewhere: the same features, bit for bit, the same table.
  again = probe.run(_probe_config(run_dir, **small), str(run_dir / "run"),
                    out_dir=str(tmp_path / "again"))
  assert again["features"] == first["features"] and again["pretrained"] == first["pretrained"]
  for name in first["features"].values():
    for f in (feat_dir / name).rglob("*.npy"):
      twin = tmp_path / "again" / "features" / name / f.relative_to(feat_dir / name)
      assert f.read_bytes() == twin.read_bytes(), f


def test_run_start_up_errors(run_dir):
  workdir = str(run_dir / "run")
  with pytest.raises(ValueError, match="n_layer"):
    probe.run(_probe_config(run_dir, model=dict(CFG.to_dict(), n_layer=3)), workdir)
  with pytest.raises(ValueError, match="out of range"):
    probe.run(_probe_config(run_dir, layers=(0, CFG.n_layer + 1)), workdir)
  config = _probe_config(run_dir)
  config.data.name = str(run_dir / "unlabelled.npz")
  with pytest.raises(ValueError, match="unlabelled"):
    probe.run(config, workdir)


def test_run_checkpoints_probes_each_step_and_draws_figure_3(run_dir, params):
  workdir = run_dir / "steps"
  palette = np.random.default_rng(1).uniform(-1, 1, (CFG.vocab_size, 3)).astype(np.float32)
  later = model_lib.init_params(CFG, jax.random.key(1))
  for step, p in ((10, params), (20, later)):
    ckpt_lib.save_params(str(workdir), CFG, p, palette, step=step)
  # Held-out loss at step 20 only: step 10 stays out of the plot but not out of the rows.
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
      {"step": 10, "train_loss": 3.0}, {"step": 20, "train_loss": 2.5, "eval_loss": 2.4})))
  config = _probe_config(run_dir, concat_k=1, low_data=dict(sizes=(), seeds=1, balanced=True))
  assert ckpt_lib.steps(str(workdir)) == [10, 20]
  rows = probe.run_checkpoints(config, str(workdir), [10, 20])

  assert [r["step"] for r in rows] == [10, 20]
  assert "eval_loss" not in rows[0] and rows[1]["eval_loss"] == 2.4
  for row in rows:  # each row is the single-checkpoint probe's table
    step_dir = workdir / "probe" / f"step_{row['step']:07d}"
    saved = json.load(open(step_dir / "results.json"))
    assert saved["step"] == row["step"]
    saved = saved["pretrained"]
    assert row["probe_layer"] == saved["best_layer"] == probe.best_layer(
        {int(l): r for l, r in saved["layers"].items()})
    assert saved["best_layer_by"] == "val_loss"
    assert row["probe_accuracy"] == saved["best_accuracy"] == row[
        f"probe_accuracy_layer{row['probe_layer']:02d}"]
    assert not (step_dir / "features").exists()  # deleted once fitted
  assert json.load(open(workdir / "probe" / "checkpoints.json")) == json.loads(json.dumps(rows))
  assert (workdir / "probe" / "probe_vs_loss.png").stat().st_size > 1000


def test_checkpoints_flag_names_steps_on_disk(run_dir):
  from absl import app
  from launch import probe as launch_probe
  workdir = str(run_dir / "run")  # one checkpoint, step 0
  assert launch_probe.checkpoint_steps(workdir, "all") == [0]
  assert launch_probe.checkpoint_steps(workdir, "0,") == [0]
  with pytest.raises(app.UsageError, match=r"no checkpoint at \[5\].*on disk: \[0\]"):
    launch_probe.checkpoint_steps(workdir, "0,5")
  with pytest.raises(app.UsageError, match="takes 'all' or steps"):
    launch_probe.checkpoint_steps(workdir, "latest")


# -- the evaluator inside training -------------------------------------------------------------

def _evaluator_config(root, **overrides):
  """(config.evals.probe, the training config it reads data and batch_size from)."""
  config = ml_collections.ConfigDict(dict(
      data=dict(name=str(root / "tiny.npz"), train_split="train[:48]", eval_split="train[32:]"),
      batch_size=8))
  ecfg = ml_collections.ConfigDict(dict(
      type="probe", every=10, train_split="train[:32]", eval_split="train[32:]", layers=(),
      reading="ln1", l2s=(1e-2, 1e-1)))
  ecfg.update(overrides)
  return ecfg, config


def test_spread_layers_include_the_middle_and_the_top():
  assert probe.spread_layers(3) == (1, 2, 3)
  assert probe.spread_layers(24) == (6, 12, 18, 24)
  assert probe.spread_layers(2) == (0, 1, 2)


def test_evaluator_on_a_sharded_mesh_is_within_one_test_image_of_the_offline_probe(run_dir, params):
  from igpt_jax import data as data_lib
  from igpt_jax import sharding as sharding_lib
  ecfg, config = _evaluator_config(run_dir)
  assert probe.make_evaluator(*_evaluator_config(run_dir, every=0), CFG, None, None) is None
  palette = np.random.default_rng(1).uniform(-1, 1, (CFG.vocab_size, 3)).astype(np.float32)
  mesh = sharding_lib.make_mesh((2, 2, 2))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
    sharded = jax.device_put(params, steps.param_shardings(CFG, mesh))
    evaluate = probe.make_evaluator(ecfg, config, CFG, palette, mesh)
    got = evaluate(sharded, 10)
  layers = probe.spread_layers(CFG.n_layer)
  assert got["probe_layer"] in layers and 0 < got["probe_seconds"]
  assert 0 < got["probe_time_fraction"] <= 1
  assert got["probe_accuracy"] == got[f"probe_accuracy_layer{got['probe_layer']:02d}"]

  def split(name):  # the same images through the offline path: extraction on 1 device
    rows = list(data_lib.make_dataset(config.data, split=name, batch_size=8, palette=palette,
                                      n_px=CFG.n_px, train=False))
    valid = np.concatenate([r["valid"] for r in rows])
    tokens = np.concatenate([r["tokens"] for r in rows])[valid]
    feats = probe.extract_features(CFG, params, tokens, layers, 8,
                                   mesh=sharding.make_mesh((1, 1, 1), jax.local_devices()[:1]))
    return feats, np.concatenate([r["labels"] for r in rows])[valid]

  (train_x, train_y), (test_x, test_y) = split("train[:32]"), split("train[32:]")
  assert len(test_y) == 16
  want = {l: probe.linear_probe(train_x[l], train_y, test_x[l], test_y, l2s=ecfg.l2s)
          for l in layers}
  for l in layers:
    assert abs(got[f"probe_accuracy_layer{l:02d}"] - want[l]["accuracy"]) <= 1 / 16
  assert got["probe_layer"] == probe.best_layer(want)  # chosen on validation, as offline


def test_probe_vs_loss_plot_from_the_metrics(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 3.0}) + "\n")
  assert probe.write_probe_vs_loss(str(tmp_path)) is None  # no probe rows yet
  rows = [{"step": s, "eval_loss": 3.0 - s / 100, "probe_accuracy": .2 + s / 1000,
           "probe_layer": 2, "probe_accuracy_layer01": .2, "probe_accuracy_layer02": .2 + s / 1000}
          for s in (10, 20, 30)]
  rows.append({"step": 30, "train_loss": 2.5})  # a resumed run re-logs a step: the last wins
  rows.append({**rows[0], "step": 40, "eval_loss": 2.5})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  assert [r["step"] for r in probe.probe_rows(str(tmp_path))] == [10, 20, 40]
  path = probe.write_probe_vs_loss(str(tmp_path))
  assert path == str(tmp_path / "probe_vs_loss.png") and os.path.getsize(path) > 1000
