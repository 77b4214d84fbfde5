"""The offline probe of a checkpoint, behind launch/probe.py: extract, then probe every layer.

  run(config, workdir, baselines=False) -> results dict (written to results.json)
  run_checkpoints(config, workdir, steps) -> rows       the same at each step, and Figure 3

Every process of the job runs it. Extraction spans the mesh of all their devices (the
parameters restored in their training layout, sharded over it), each process reading its own
slice of each split and writing its own shards (`features.write_features`) into a set keyed
by what it holds (`features.feature_set`): a rerun resumes it, a probe of other splits, layers
or checkpoints extracts beside it, and a complete set that holds what a probe reads is reused.
Each probe then runs by the solver the config names, or by size for "auto"
(`stream.solver_for`): L-BFGS reads every shard into memory on every process (the workdir must
be shared, e.g. gs://) and all fit the same probe; SGD streams each process's own shards, data
parallel over the mesh. The best layer is the one of least validation loss (on rows held out
of train; `protocol.best_layer`); the concatenation, the low-data probes and the attentive
probe (`attentive.py`, with config.attentive.k_layers) centre on it. Process 0 writes
results.json and the plot.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Sequence

import jax
from absl import logging

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import console
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import paths
from igpt_jax import sharding as sharding_lib
from igpt_jax import steps as steps_lib
from igpt_jax.probe import attentive
from igpt_jax.probe import features as features_lib
from igpt_jax.probe import logistic
from igpt_jax.probe import plots
from igpt_jax.probe import protocol
from igpt_jax.probe import stream


def checked_batches(data_cfg, split: str, palette, n_px: int, batch_size: int):
  """This process's eval batches of a split; ValueError before any extraction if the split has
  no labels."""
  from igpt_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  batches = data_lib.make_dataset(data_cfg, split=split, batch_size=batch_size,
                                  palette=palette, n_px=n_px, train=False)
  first = next(batches)
  labels = first["labels"][first["valid"]]
  if labels.size and labels.min() < 0:  # tfds marks unlabelled images (stl10 "unlabelled") -1
    raise ValueError(f"split {split!r} of {data_cfg['name']!r} has unlabelled images "
                     f"(label {labels.min()}); a probe needs a labelled split")
  return itertools.chain([first], batches)


def _restore(config, workdir: str, step: int | None, mesh):
  """(cfg, params laid out over mesh, palette) of the checkpoint, config.model applied."""
  fields = model_lib.set_fields(config.model)
  runtime = {k: fields.pop(k) for k in ("attention", "dtype") if k in fields}
  cfg, params, palette = ckpt_lib.load(workdir, step, mesh=mesh, **runtime)
  if fields:
    ckpt_lib.check_compatible(cfg.to_dict(), model_lib.model_config(fields), workdir)
    cfg = cfg.replace(**{k: v for k, v in fields.items() if k in ckpt_lib.RUNTIME_FIELDS})
  return cfg, params, palette


def _prober(config, feat_dir, sets: dict, mesh):
  """fit(names) -> probe record of features `names` (concatenated), by the config's solver.
  sets: {"train": split, "test": split}, the feature sets under feat_dir."""
  n_train = sum(s["rows"] for s in features_lib.shards(feat_dir, sets["train"]))
  opts = dict(l2s=tuple(config.l2s), val_fraction=config.val_fraction)

  def fit(names):
    dim = sum(features_lib.feature_dim(feat_dir, sets["train"], n) for n in names)
    solver = stream.solver_for(config.solver, n_train, dim, config.lbfgs_max_bytes)
    if solver == "sgd":
      return stream.stream_probe(feat_dir, names, mesh=mesh, lrs=tuple(config.sgd.lrs),
                                 epochs=config.sgd.epochs, batch_size=config.sgd.batch_size,
                                 chunk_rows=config.sgd.chunk_rows, **sets, **opts)
    data = [features_lib.load_feature(feat_dir, sets[s], n) for s in ("train", "test")
            for n in (names, "labels")]
    return {**logistic.linear_probe(*data, **opts), "solver": "lbfgs"}

  return fit


def feature_sets(out_dir: paths.PathLike) -> tuple[str, dict]:
  """(feat_dir, {"train": split, "test": split}) of the features a finished `run` into out_dir
  probed, as its results.json records them: for tools that refit on them."""
  results = paths.read_json(paths.path(out_dir) / "results.json")
  return os.fspath(paths.path(out_dir) / "features"), results["features"]


def _layer_names(prefix: str):
  return lambda layers: [f"{prefix}layer{l:02d}" for l in layers]


def _extract(config, workdir: str, step: int, cfg, params, palette, layers, mesh, feat_dir,
             baselines: bool) -> dict:
  """{"train": split, "test": split}: the feature sets under feat_dir holding what this probe
  reads, extracted where no complete set holds it (resuming an interrupted one)."""
  from igpt_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  per_process = features_lib.rows_per_process(config.batch_size, mesh)
  splits = {"train": config.data.train_split, "test": config.data.eval_split}
  # Each split's features are a set keyed by what they hold (features.feature_set): a probe of
  # another split, other layers or another checkpoint extracts beside the sets already there.
  names = [f"layer{l:02d}" for l in layers] + ["labels"]
  if baselines:
    names += [f"random_layer{l:02d}" for l in layers]
    names += [f"pixels_{k}" for k in features_lib.PIXEL_KINDS]
  data = {k: v for k, v in dict(config.data).items() if k not in ("train_split", "eval_split")}
  spec = {"workdir": paths.absolute(workdir), "step": step, "model": cfg.to_dict(),
          "data": data, "reading": config.reading, "k_masks": config.k_masks,
          "dtype": config.feature_dtype, "random_init_seed": config.random_init_seed}
  layout = {"processes": jax.process_count(), "rows_per_batch": per_process,
            "shard_batches": config.shard_batches}
  found = {role: features_lib.feature_set(feat_dir, role, {**spec, "split": split}, names,
                                          layout) for role, split in splits.items()}
  sets = {role: name for role, (name, _) in found.items()}
  todo = {role: record for role, (_, record) in found.items() if "rows" not in record}
  for role in splits.keys() - todo.keys():
    logging.info("features of %s (%s): reusing %s", role, splits[role], feat_dir / sets[role])
  if not todo:
    return sets
  # The start-up's silent seconds, shown: opening the splits imports tensorflow (5 s on the
  # demo's idle CPU, 15 - 45 s loaded) and the random-init twin's XLA compile takes as long.
  with console.status(f"opening {' and '.join(splits[r] for r in todo)} of {config.data.name}"):
    batches = {role: checked_batches(config.data, splits[role], palette, cfg.n_px, per_process)
               for role in todo}
  extract = functools.partial(features_lib.featurizer, cfg, layers=layers,
                              reading=config.reading, mesh=mesh, k_masks=config.k_masks)
  models = {"": extract(params)}
  if baselines:
    with console.status("initialising the random-init twin"):
      random_params = jax.block_until_ready(jax.jit(
          functools.partial(model_lib.init_params, cfg),
          out_shardings=steps_lib.param_shardings(cfg, mesh))(
              jax.random.key(config.random_init_seed)))
    models["random_"] = extract(random_params)

  def featurize(tokens, index):  # one pass over the data feeds every model and baseline
    out = {}
    for prefix, fn in models.items():
      out.update({f"{prefix}layer{l:02d}": f for l, f in fn(tokens, index).items()})
    if baselines:
      out.update({f"pixels_{k}": features_lib.pixel_features(tokens, palette, cfg.n_px, k)
                  for k in features_lib.PIXEL_KINDS})
    return out

  for role, record in todo.items():
    rows = data_lib.num_examples(config.data, splits[role])
    with console.progress(desc=f"features of {role} ({splits[role]})", unit="img",
                          total=rows) as bar:
      features_lib.write_features(batches[role], featurize, feat_dir, sets[role], rows=rows,
                                  shard_batches=config.shard_batches,
                                  dtype=config.feature_dtype, on_rows=bar.update,
                                  record=record)
  return sets


def run(config, workdir: str, *, baselines: bool = False, step: int | None = None,
        out_dir: str | None = None) -> dict:
  """Extracts, probes every layer (+ concat, low-data, baselines), writes out_dir.

  config: see experiments/probe_base.py; its `model` may set `attention` / `dtype` (runtime
  fields, `checkpoint.load`) and architecture fields the checkpoint must match. step: the
  checkpoint (None: the newest readable). workdir and out_dir (default workdir/probe) may be
  local or gs://. Returns the dict written to results.json.
  """
  mesh = sharding_lib.make_mesh(config.mesh)
  with console.status(f"restoring {workdir}"):
    cfg, params, palette = _restore(config, workdir, step, mesh)
    step = ckpt_lib.read_meta(workdir, step)["step"]
  layers = tuple(config.layers) if config.layers else tuple(range(cfg.n_layer + 1))
  model_lib.check_layers(cfg, layers)
  out_dir = out_dir or paths.path(workdir) / "probe"
  feat_dir = paths.path(out_dir) / "features"
  splits = {"train": config.data.train_split, "test": config.data.eval_split}
  logging.info("probing %s (%s) layers %s on mesh %s", workdir, cfg, layers, dict(mesh.shape))
  sets = _extract(config, workdir, step, cfg, params, palette, layers, mesh, feat_dir,
                  baselines)

  fit = _prober(config, feat_dir, sets, mesh)
  n_rows = {s: sum(x["rows"] for x in features_lib.shards(feat_dir, sets[s])) for s in splits}
  results = {"workdir": paths.absolute(workdir), "step": step, "model": cfg.to_dict(),
             "data": dict(config.data), "reading": config.reading, "features": sets,
             "n_train": n_rows["train"], "n_test": n_rows["test"]}

  def probing(desc: str, probes: int):
    return console.progress(desc=desc, total=probes, unit="probe")

  def counted(bar, names_of):  # fit(names_of(layers)), one bar step each
    def fn(layers):
      out = fit(names_of(layers))
      bar.update(1)
      return out
    return fn

  with probing(f"probing {len(layers)} layers", len(layers)) as bar:
    table = results["pretrained"] = protocol.probe_layers(counted(bar, _layer_names("")), layers,
                                                          config.best_layer_by)
  best = table["best_layer"]
  summary = {"best_layer": best, "best_layer_by": config.best_layer_by,
             "pretrained": table["best_accuracy"]}
  logging.info("best layer on validation (%s) %d: %.2f%% on test (by layer: %s)",
               config.best_layer_by, best, 100 * table["best_accuracy"],
               ", ".join(f"{l} {100 * r['accuracy']:.2f}%" for l, r in table["layers"].items()))
  if config.concat_k > 1:
    with probing(f"probing {config.concat_k} layers concatenated", 1) as bar:
      results["concat"] = protocol.concat_layers(counted(bar, _layer_names("")), best,
                                                 config.concat_k, layers)
    summary["concat"] = results["concat"]["accuracy"]
  if config.low_data.sizes:
    low = config.low_data
    with console.progress(desc=f"low-data probes of layer {best}",
                          total=len(low.sizes) * low.seeds, unit="fit") as bar:
      data = [features_lib.load_feature(feat_dir, sets[s], n) for s in ("train", "test")
              for n in (f"layer{best:02d}", "labels")]
      results["low_data"] = protocol.low_data_probe(
          *data, sizes=tuple(low.sizes), seeds=low.seeds, balanced=low.balanced,
          l2s=tuple(config.l2s), val_fraction=config.val_fraction)
      bar.update(len(low.sizes) * low.seeds)
  curves = {"pretrained": {l: r["accuracy"] for l, r in table["layers"].items()}}
  chosen, flat, points = {"pretrained": best}, {}, {}
  if config.attentive.k_layers:
    heads_on = protocol.ranked_layers(table["layers"], config.best_layer_by)[
        :config.attentive.k_layers]
    att = results["attentive"] = attentive.attentive_probe(
        config.attentive, config.data, splits, cfg, params, palette, heads_on, mesh,
        val_fraction=config.val_fraction)
    summary["attentive"] = att["accuracy"]
    points[f"attentive, layers {att['layers']}" if len(heads_on) > 1 else
           "attentive"] = (best, att["accuracy"])
    logging.info("attentive probe of layers %s: %.2f%% (linear at layer %d: %.2f%%)",
                 att["layers"], 100 * att["accuracy"], best, 100 * table["best_accuracy"])
  if baselines:
    with probing("baselines: random init, pixels",
                 len(layers) + len(features_lib.PIXEL_KINDS)) as bar:
      random = protocol.probe_layers(counted(bar, _layer_names("random_")), layers,
                                     config.best_layer_by)
      results["baselines"] = {"random_init": random}
      curves["random init"] = {l: r["accuracy"] for l, r in random["layers"].items()}
      chosen["random init"] = random["best_layer"]
      summary["random_init"] = random["best_accuracy"]
      for kind in features_lib.PIXEL_KINDS:
        r = results["baselines"][f"pixels_{kind}"] = fit([f"pixels_{kind}"])
        bar.update(1)
        flat[f"pixels ({kind})"] = summary[f"pixels_{kind}"] = r["accuracy"]
  results["summary"] = summary
  if jax.process_index() == 0:
    plots.write_json(paths.path(out_dir) / "results.json", results)
    plots.plot_accuracy(paths.path(out_dir) / "accuracy_by_layer.png", curves, flat,
                        chosen=chosen, points=points)
  logging.info("summary: %s", summary)
  return results


def run_checkpoints(config, workdir: str, steps: Sequence[int]) -> list[dict]:
  """`run` at each checkpoint step: the paper's Figure 3 with the full protocol, after the run.

  Step s writes workdir/probe/step_{s:07d}/ (results.json and the layer plot; its features are
  deleted once fitted: a run's worth of steps would hold N x layers x D floats each). Returns
  one row per step, as the in-loop evaluator logs them (probe_accuracy, probe_layer,
  probe_accuracy_layerNN) plus the run's held-out loss at that step from metrics.jsonl, and
  writes them to workdir/probe/checkpoints.json and workdir/probe/probe_vs_loss.png (steps
  without a held-out loss are left out of the plot, with a warning).
  """
  root = paths.path(workdir) / "probe"
  losses = {s: r["eval_loss"] for s, r in metrics_lib.read(workdir).items() if "eval_loss" in r}
  rows = []
  for step in steps:
    out_dir = root / f"step_{step:07d}"
    table = run(config, workdir, step=step, out_dir=out_dir)["pretrained"]
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"probe of step {step} done")
    if jax.process_index() == 0:
      (out_dir / "features").rmtree()
    rows.append({"step": step, "probe_accuracy": table["best_accuracy"],
                 "probe_layer": table["best_layer"],
                 **{f"probe_accuracy_layer{l:02d}": r["accuracy"]
                    for l, r in table["layers"].items()},
                 **({"eval_loss": losses[step]} if step in losses else {})})
  if jax.process_index() == 0:
    plots.write_json(root / "checkpoints.json", rows)
  if missing := [r["step"] for r in rows if "eval_loss" not in r]:
    logging.warning("metrics.jsonl of %s has no held-out loss at steps %s: they are left out "
                    "of probe_vs_loss.png", workdir, missing)
  if (plotted := [r for r in rows if "eval_loss" in r]) and jax.process_index() == 0:
    plots.plot_probe_vs_loss(root / "probe_vs_loss.png", plotted)
  return rows
