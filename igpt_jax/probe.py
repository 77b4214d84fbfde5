"""Linear probes on frozen iGPT features, as in the paper.

Extraction is a separate pass: one jitted program (`features_fn`) over a mesh of the local
devices, the batch split over it, the parameters in their training layout (replicated, or
split over an fsdp axis for models larger than a chip). Each layer's feature is the mean over
positions of the block input read after ln_1 (the paper's probe) or before it ("residual"), or
with the "_2x2" readings the mean over each image quadrant; layer n_layer is the ln_f output.

  extract_features(cfg, params, tokens, layers, batch_size) -> {layer: np [N, D]}   in memory
  write_features(batches, featurize, out_dir, split) -> {name: path}                 streaming
  linear_probe(train_x, train_y, test_x, test_y, **opts) -> dict                      L-BFGS
  probe_layers / low_data_probe / concat_layers                                       the tables
  pixel_features(tokens, palette, n_px)                                               baselines
  run(config, workdir, baselines=False) -> results dict                   behind launch/probe.py
  run_checkpoints(config, workdir, steps) -> rows       the same at each step, and Figure 3
  make_evaluator(ecfg, config, cfg, palette, mesh) -> fn(params, step) -> scalars  in training
  write_probe_vs_loss(workdir) -> path of the paper's Figure 3 from metrics.jsonl

The probe is multinomial logistic regression, fitted full-batch with `optax.lbfgs` (zoom line
search) in one jitted loop on standardised features. Its penalty `l2` multiplies 0.5 * |W|^2
next to the mean cross-entropy, so scikit-learn's C is 1 / (l2 * n_train); the bias is not
penalised (as in scikit-learn).
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from typing import Callable, Iterable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from absl import logging

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import console
from igpt_jax import metrics as metrics_lib
from igpt_jax import model as model_lib
from igpt_jax import palette as palette_lib
from igpt_jax import paths
from igpt_jax import sharding as sharding_lib
from igpt_jax import steps as steps_lib

DEFAULT_L2S = tuple(10.0 ** np.arange(-5, 0))  # 1e-5 .. 1e-1 on the mean-loss scale
LOW_DATA_SIZES = (40, 250, 4000)
PIXEL_KINDS = ("histogram", "rgb")


# -- extraction -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def features_fn(cfg: model_lib.IGPTConfig, layers: tuple[int, ...], reading: str) -> Callable:
  """Jitted (params, tokens [B, T]) -> {layer: float32 [B, F]}, run where its inputs lie.

  The one extraction program: the probe pass (`featurizer`), the in-training probe and
  launch/plan.py's "extract" all compile it, with the parameters as training lays them out
  over the mesh and the batch split over its batch axes. Call it under `jax.set_mesh(mesh)`
  and `nn.logical_axis_rules(sharding.RULES)`.
  """
  def features(params, tokens):
    # BERT models are probed unmasked: an all-False mask zeroes no embedding.
    mask = jnp.zeros(tokens.shape, bool) if cfg.objective == "bert" else None
    return model_lib.IGPT(cfg).apply({"params": params}, tokens, layers, reading, mask,
                                     method=model_lib.IGPT.features)
  return jax.jit(features)


def featurizer(cfg: model_lib.IGPTConfig, params, layers: Sequence[int] | None = None,
               reading: str = "ln1", mesh: Mesh | None = None) -> Callable:
  """fn(tokens int [B, T]) -> {layer: float32 jax.Array [B, D]}, B split over the mesh.

  mesh: a `sharding.make_mesh` mesh of this host's devices (default: data parallel over all of
  them). The parameters are put in their training layout over it once, here (replicated on a
  data mesh, split along `embed` over fsdp: how iGPT-L / XL fit 16 GB chips); parameters
  already laid out so (`checkpoint.load(..., mesh=mesh)`) stay where they are. B must divide by
  the mesh's batch shards (pad it; see `extract_features`). Results are not fetched (async
  dispatch): see `_pipelined`.
  """
  layers = tuple(range(cfg.n_layer + 1) if layers is None else layers)
  model_lib.check_layers(cfg, layers)
  if reading not in model_lib.READINGS:
    raise ValueError(f"reading={reading!r}; expected one of {model_lib.READINGS}")
  mesh = mesh or sharding_lib.make_mesh((-1, 1, 1), jax.local_devices())
  fn = features_fn(cfg, layers, reading)
  params = jax.device_put(params, steps_lib.param_shardings(cfg, mesh))
  shards = sharding_lib.batch_shards(mesh)

  def featurize(tokens):
    tokens = np.asarray(tokens)
    model_lib.check_tokens(tokens, cfg)
    if len(tokens) % shards:
      raise ValueError(f"batch of {len(tokens)} does not split over the {shards} batch shards "
                       f"of mesh {dict(mesh.shape)}")
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.RULES):
      return fn(params, sharding_lib.shard_batch({"tokens": tokens}, mesh)["tokens"])

  return featurize


def _pipelined(fn: Callable, items: Iterable):
  """Yields (item, fn(item) fetched to host); fn of the next item is dispatched before the
  current result is fetched, so device compute overlaps the copy and the host-side work."""
  pending = None
  for item in items:
    out = fn(item)
    if pending is not None:
      yield pending[0], jax.device_get(pending[1])
    pending = (item, out)
  if pending is not None:
    yield pending[0], jax.device_get(pending[1])


def _padded(tokens: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads [b, T] to [size, T] (token 0 is a valid id; the rows are dropped afterwards)."""
  return np.concatenate([tokens, np.zeros((size - len(tokens), tokens.shape[1]), tokens.dtype)])


def extract_features(cfg: model_lib.IGPTConfig, params, tokens, layers=None,
                     batch_size: int = 256, reading: str = "ln1",
                     mesh: Mesh | None = None) -> dict[int, np.ndarray]:
  """Mean-pooled features of every row of tokens [N, T]: {layer: np.float32 [N, D]}.

  batch_size is the global batch, rounded up to a multiple of the mesh's batch shards (mesh:
  as `featurizer`); the last batch is padded, so every call compiles once.
  """
  tokens = np.asarray(tokens)
  model_lib.check_tokens(tokens, cfg)
  mesh = mesh or sharding_lib.make_mesh((-1, 1, 1), jax.local_devices())
  featurize = featurizer(cfg, params, layers, reading, mesh)
  shards = sharding_lib.batch_shards(mesh)
  batch_size = -(-batch_size // shards) * shards
  starts = range(0, len(tokens), batch_size)
  chunks = [{l: f[:len(tokens) - start] for l, f in feats.items()} for start, feats in
            _pipelined(lambda s: featurize(_padded(tokens[s:s + batch_size], batch_size)), starts)]
  return {l: np.concatenate([c[l] for c in chunks]) for l in chunks[0]}


def pixel_features(tokens, palette, n_px: int, kind: str = "histogram") -> np.ndarray:
  """Raw-pixel baseline features of tokens [N, T]: float32 [N, F].

  "histogram": fraction of the image's pixels in each palette colour (F = k);
  "rgb": the dequantized image flattened, in [-1, 1] (F = 3 T).
  """
  tokens = np.asarray(tokens)
  palette = palette_lib.check_palette(palette)
  if kind == "histogram":
    k = len(palette)
    counts = np.zeros((len(tokens), k), np.float32)
    np.add.at(counts, (np.arange(len(tokens))[:, None], tokens), 1.0)
    return counts / tokens.shape[1]
  if kind == "rgb":
    rgb = np.asarray(palette_lib.dequantize(tokens, palette, n_px), np.float32)
    return (rgb / 127.5 - 1.0).reshape(len(tokens), -1)
  raise ValueError(f"kind={kind!r}; expected one of {PIXEL_KINDS}")


def feature_path(out_dir: paths.PathLike, split: str, name) -> str:
  """Where `write_features` puts feature `name` (a layer index, or a string) of a split."""
  name = f"layer{name:02d}" if isinstance(name, int) else name
  return os.fspath(paths.path(out_dir) / f"{split}_{name}.npy")


def write_features(batches: Iterable[Mapping[str, np.ndarray]],
                   featurize: Callable[[np.ndarray], Mapping], out_dir: paths.PathLike,
                   split: str, *, rows: int,
                   on_rows: Callable[[int], object] | None = None) -> dict[str, str]:
  """Streams eval batches through `featurize` into `out_dir/{split}_{name}.npy` files.

  batches: dicts with "tokens" [B, T], "labels" [B] and optionally "valid" [B] (the padded
  last batch of `data.make_dataset(..., train=False)`). featurize(tokens) -> {name: [B, F]}
  (numpy or jax arrays; the next batch is dispatched before this one is fetched).
  rows: the number of valid rows the batches hold (`data.num_examples`): each file's .npy
  header is written first and its rows streamed after it batch by batch, so memory holds one
  batch of activations whatever the split size, and out_dir may be local or in a bucket.
  Another count is a ValueError (and the files are removed). Integer names (layers) become
  `{split}_layer{l:02d}.npy`; labels are written as `{split}_labels.npy`. on_rows(n) is called
  with each batch's number of valid rows once they are written (a progress bar's update).
  Returns {name: path} including "labels".
  """
  paths.path(out_dir).mkdir(parents=True, exist_ok=True)
  files, n = {}, 0
  try:
    for batch, feats in _pipelined(lambda b: featurize(b["tokens"]), batches):
      valid = np.asarray(batch.get("valid", np.ones(len(batch["tokens"]), bool)), bool)
      feats = {**feats, "labels": np.asarray(batch["labels"], np.int32)}
      for name, value in feats.items():
        value = np.ascontiguousarray(np.asarray(value)[valid])
        if name not in files:
          files[name] = paths.path(feature_path(out_dir, split, name)).open("wb")
          np.lib.format.write_array_header_1_0(files[name], {
              "descr": np.lib.format.dtype_to_descr(value.dtype), "fortran_order": False,
              "shape": (rows, *value.shape[1:])})
        files[name].write(value.tobytes())
      n += int(valid.sum())
      if on_rows is not None:
        on_rows(int(valid.sum()))
  finally:
    for f in files.values():
      f.close()
  if n != rows:
    for name in files:
      paths.path(feature_path(out_dir, split, name)).unlink()
    raise ValueError(f"split {split!r} gave {n} (valid) examples, {rows} expected")
  return {name: feature_path(out_dir, split, name) for name in files}


# -- the probe --------------------------------------------------------------------------------

def _standardise(train_x, *others):
  mean = train_x.mean(axis=0)
  std = train_x.std(axis=0) + 1e-6
  return [(x - mean) / std for x in (train_x, *others)]


def _bucket(n: int) -> int:
  """n rounded up to 1/8 of its power of two (>= 8): fits of similar sizes share a compile."""
  step = 2 ** max(3, n.bit_length() - 4)
  return -(-n // step) * step


@functools.partial(jax.jit, static_argnames=("n_classes", "max_iter"))
def _fit(x, y, weight, l2, init, *, n_classes: int, max_iter: int, tol: float):
  """Full-batch L-BFGS on the weighted mean CE + l2/2 |W|^2, from init {"w" [F, C], "b" [C]}.

  x [N, F] f32, y [N] int, weight [N] (0 on padding rows) -> ({"w" [F, C], "b" [C]}, iterations).
  """
  def loss(p):
    logits = x @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(weight * ce) / jnp.sum(weight) + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)
  params = init

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(p, updates), state

  def running(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(running, step, (params, opt.init(params)))
  return params, otu.tree_get(state, "count")


def _accuracy(params, x, y) -> float:
  return float(np.mean(np.argmax(x @ np.asarray(params["w"]) + np.asarray(params["b"]), -1) == y))


def _cross_entropy(params, x, y) -> float:
  logits = x @ np.asarray(params["w"]) + np.asarray(params["b"])
  logits = logits - logits.max(-1, keepdims=True)
  return float(np.mean(np.log(np.exp(logits).sum(-1)) - logits[np.arange(len(y)), y]))


def fit_logistic(x, y, l2: float, n_classes: int, *, max_iter: int = 1000, tol: float = 1e-5,
                 init=None):
  """Fits on already standardised x [N, F]; -> (params {"w", "b"} as np arrays, iterations).

  Rows are zero-padded to a size bucket with weight 0, so a sweep compiles once per bucket.
  init: the starting point (default zeros), e.g. the solution for a neighbouring l2: the loss is
  strictly convex, so it changes the iterations, not the optimum.
  """
  n = len(x)
  pad = _bucket(n) - n
  x = np.pad(np.asarray(x, np.float32), ((0, pad), (0, 0)))
  y = np.pad(np.asarray(y, np.int32), (0, pad))
  weight = (np.arange(n + pad) < n).astype(np.float32)
  if init is None:
    init = {"w": np.zeros((x.shape[1], n_classes), np.float32),
            "b": np.zeros((n_classes,), np.float32)}
  params, count = _fit(x, y, weight, np.float32(l2), init, n_classes=n_classes,
                       max_iter=max_iter, tol=tol)
  return jax.tree.map(np.asarray, params), int(count)


def validation_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(val, fit) row indices of n: the rows that score each L2 and the rows its fit sees."""
  order = np.random.default_rng(seed).permutation(n)
  n_val = max(1, int(round(val_fraction * n)))
  return order[:n_val], order[n_val:]


def linear_probe(train_x, train_y, test_x, test_y, *, l2s: Sequence[float] = DEFAULT_L2S,
                 val_fraction: float = 0.1, n_classes: int | None = None, max_iter: int = 1000,
                 tol: float = 1e-5, seed: int = 0,
                 on_fit: Callable[[], object] | None = None) -> dict:
  """Logistic-regression probe: L2 chosen on a held-out `val_fraction` of train, then refit.

  The L2 is the one of least validation cross-entropy. Validation accuracy on a few hundred
  images is too coarse to rank neighbouring penalties: on the README demo's 10 probes, picking
  by it lost 0.58 points of test accuracy on average against the best L2 of the grid in
  hindsight (at most 1.87), by cross-entropy 0.43 (half-decade grid: 0.36, at most 1.12).

  train_x [N, F], train_y [N] int, test_x [M, F], test_y [M]. Features are standardised with
  the statistics of the rows each fit trains on. on_fit() is called after each L-BFGS fit
  (`fits_per_probe(l2s)` of them: a progress bar's update). Returns {"accuracy" (test top-1,
  0..1), "l2", "val_loss" {l2: mean CE}, "val_accuracy" {l2: acc}, "train_accuracy",
  "iterations"}.
  """
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  train_y, test_y = np.asarray(train_y, np.int32), np.asarray(test_y, np.int32)
  if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f"features must be [N, F] with equal F, got {train_x.shape} and "
                     f"{test_x.shape}")
  chex.assert_shape(train_y, train_x.shape[:1])
  chex.assert_shape(test_y, test_x.shape[:1])
  n_classes = n_classes or int(max(train_y.max(), test_y.max())) + 1
  if min(train_y.min(), test_y.min()) < 0 or max(train_y.max(), test_y.max()) >= n_classes:
    raise ValueError(f"labels must lie in [0, {n_classes})")
  l2s = tuple(float(l) for l in l2s)

  # The sweep runs from the strongest penalty down, each fit starting at the previous solution
  # (a regularisation path; on the demo's features about 8% fewer iterations than from zero);
  # the refit starts at the chosen l2's solution.
  val_loss, val_acc, solutions = {}, {}, {}
  if len(l2s) > 1:
    val, fit = validation_split(len(train_x), val_fraction, seed)
    fx, vx = _standardise(train_x[fit], train_x[val])
    init = None
    for l2 in sorted(l2s, reverse=True):
      init, _ = fit_logistic(fx, train_y[fit], l2, n_classes, max_iter=max_iter, tol=tol,
                             init=init)
      val_loss[l2] = _cross_entropy(init, vx, train_y[val])
      val_acc[l2], solutions[l2] = _accuracy(init, vx, train_y[val]), init
      if on_fit is not None:
        on_fit()
  best = min(l2s, key=lambda l: (val_loss.get(l, 0.0), -l))  # ties: the stronger penalty

  tx, sx = _standardise(train_x, test_x)
  params, iterations = fit_logistic(tx, train_y, best, n_classes, max_iter=max_iter, tol=tol,
                                    init=solutions.get(best))
  if on_fit is not None:
    on_fit()
  return {"accuracy": _accuracy(params, sx, test_y), "l2": best, "val_loss": val_loss,
          "val_accuracy": val_acc, "train_accuracy": _accuracy(params, tx, train_y),
          "iterations": iterations}


def fits_per_probe(l2s: Sequence[float]) -> int:
  """L-BFGS fits in one `linear_probe`: one per L2 of a sweep, then the refit."""
  return len(l2s) + 1 if len(l2s) > 1 else 1


# -- tables -----------------------------------------------------------------------------------

def probe_layers(load: Callable[[int], tuple], layers: Iterable[int], **probe_opts) -> dict:
  """Probes every layer. load(layer) -> (train_x, train_y, test_x, test_y), one layer in memory
  at a time. -> {"layers": {layer: probe result}, "best_layer", "best_accuracy"}."""
  results = {int(l): linear_probe(*load(l), **probe_opts) for l in layers}
  best = max(results, key=lambda l: results[l]["accuracy"])
  return {"layers": results, "best_layer": best, "best_accuracy": results[best]["accuracy"]}


def concat_layers(load: Callable[[int], tuple], center: int, k: int, n_layers: int,
                  **probe_opts) -> dict:
  """Probe on the concatenation of k layers around `center` (clipped to 0..n_layers)."""
  lo = max(0, min(center - k // 2, n_layers + 1 - k))
  chosen = list(range(lo, min(lo + k, n_layers + 1)))
  parts = [load(l) for l in chosen]
  train_x = np.concatenate([p[0] for p in parts], axis=1)
  test_x = np.concatenate([p[2] for p in parts], axis=1)
  return {"layers": chosen, **linear_probe(train_x, parts[0][1], test_x, parts[0][3],
                                           **probe_opts)}


def label_subset(labels, size: int, seed: int, balanced: bool = True) -> np.ndarray:
  """Indices of `size` labelled examples: per-class balanced (size // classes each) or random."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  if not balanced:
    return np.sort(rng.choice(len(labels), size, replace=False))
  classes = np.unique(labels)
  per_class = size // len(classes)
  if per_class == 0:
    raise ValueError(f"{size} labels cannot cover {len(classes)} classes")
  picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
  return np.sort(np.concatenate(picks))


def low_data_probe(train_x, train_y, test_x, test_y, *, sizes: Sequence[int] = LOW_DATA_SIZES,
                   seeds: int = 5, balanced: bool = True, **probe_opts) -> dict:
  """The paper's low-data probes: {size: {"mean", "std", "accuracies"}} over `seeds` subsets."""
  n_classes = int(max(np.max(train_y), np.max(test_y))) + 1
  out = {}
  for size in sizes:
    if size > len(train_x):
      raise ValueError(f"low-data size {size} exceeds the {len(train_x)} training examples")
    accs = []
    for seed in range(seeds):
      idx = label_subset(train_y, size, seed, balanced)
      accs.append(linear_probe(train_x[idx], train_y[idx], test_x, test_y, n_classes=n_classes,
                               seed=seed, **probe_opts)["accuracy"])
    out[int(size)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
                      "accuracies": accs}
  return out


def plot_accuracy(path: str, curves: Mapping[str, Mapping[int, float]],
                  baselines: Mapping[str, float] | None = None) -> None:
  """PNG of probe accuracy vs layer, one line per curve, baselines as horizontal lines."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
  for name, acc in curves.items():
    layers = sorted(acc)
    ax.plot(layers, [100 * acc[l] for l in layers], marker="o", label=name)
  for i, (name, acc) in enumerate((baselines or {}).items()):
    ax.axhline(100 * acc, linestyle="--", color=f"C{i + len(curves)}", label=name)
  ax.set_xlabel("layer (last = ln_f output)")
  ax.set_ylabel("linear probe accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  paths.write_with(path, lambda f: fig.savefig(f, dpi=120, format="png"))
  plt.close(fig)


def write_json(path: paths.PathLike, obj) -> None:
  paths.write_json(path, obj, indent=2, default=float)


# -- the whole evaluation ---------------------------------------------------------------------

def _checked_batches(config, split: str, palette, n_px: int, batch_size: int):
  """Eval batches of a split; ValueError before any extraction if the split has no labels."""
  from igpt_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  batches = data_lib.make_dataset(config.data, split=split, batch_size=batch_size,
                                  palette=palette, n_px=n_px, train=False)
  first = next(batches)
  labels = first["labels"][first["valid"]]
  if labels.size and labels.min() < 0:  # tfds marks unlabelled images (stl10 "unlabelled") -1
    raise ValueError(f"split {split!r} of {config.data['name']!r} has unlabelled images "
                     f"(label {labels.min()}); a probe needs a labelled split")
  return itertools.chain([first], batches)


def run(config, workdir: str, *, baselines: bool = False, step: int | None = None,
        out_dir: str | None = None) -> dict:
  """Extracts, probes every layer (+ concat, low-data, baselines), writes out_dir.

  config: see experiments/probe_cifar10.py; its `model` may set `attention` / `dtype` (runtime
  fields, `checkpoint.load`) and architecture fields the checkpoint must match. step: the
  checkpoint (None: the newest readable). workdir and out_dir (default workdir/probe) may be
  local or gs://. Returns the dict written to results.json.
  """
  from igpt_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  mesh = sharding_lib.make_mesh(config.mesh, jax.local_devices())
  fields = model_lib.set_fields(config.model)
  runtime = {k: fields.pop(k) for k in ("attention", "dtype") if k in fields}
  cfg, params, palette = ckpt_lib.load(workdir, step, mesh=mesh, **runtime)
  if fields:
    ckpt_lib.check_compatible(cfg.to_dict(), model_lib.model_config(fields), workdir)
    cfg = cfg.replace(**{k: v for k, v in fields.items() if k in ckpt_lib.RUNTIME_FIELDS})
  layers = tuple(config.layers) if config.layers else tuple(range(cfg.n_layer + 1))
  model_lib.check_layers(cfg, layers)
  n_dev = sharding_lib.batch_shards(mesh)
  batch_size = -(-config.batch_size // n_dev) * n_dev
  out_dir = out_dir or paths.path(workdir) / "probe"
  feat_dir = paths.path(out_dir) / "features"
  splits = {"train": config.data.train_split, "test": config.data.eval_split}
  batches = {name: _checked_batches(config, split, palette, cfg.n_px, batch_size)
             for name, split in splits.items()}
  logging.info("probing %s (%s) layers %s on mesh %s", workdir, cfg, layers, dict(mesh.shape))

  models = {"": featurizer(cfg, params, layers, config.reading, mesh)}
  if baselines:
    random_params = jax.jit(functools.partial(model_lib.init_params, cfg),
                            out_shardings=steps_lib.param_shardings(cfg, mesh))(
                                jax.random.key(config.random_init_seed))
    models["random_"] = featurizer(cfg, random_params, layers, config.reading, mesh)

  def featurize(tokens):  # one pass over the data feeds every model and baseline
    out = {}
    for prefix, fn in models.items():
      out.update({f"{prefix}layer{l:02d}": f for l, f in fn(tokens).items()})
    if baselines:
      out.update({f"pixels_{k}": pixel_features(tokens, palette, cfg.n_px, k)
                  for k in PIXEL_KINDS})
    return out

  for name, it in batches.items():
    rows = data_lib.num_examples(config.data, splits[name])
    with console.progress(desc=f"features of {name} ({splits[name]})", unit="img",
                          total=rows) as bar:
      write_features(it, featurize, feat_dir, name, rows=rows, on_rows=bar.update)
  labels = {s: paths.load_npy(feature_path(feat_dir, s, "labels")) for s in splits}

  def load(name):
    return (paths.load_npy(feature_path(feat_dir, "train", name)), labels["train"],
            paths.load_npy(feature_path(feat_dir, "test", name)), labels["test"])

  def load_layer(prefix):
    return lambda l: load(f"{prefix}layer{l:02d}")

  opts = dict(l2s=tuple(config.l2s), val_fraction=config.val_fraction)

  def fitting(desc: str, probes: int):  # a bar over the L-BFGS fits of `probes` linear probes
    return console.progress(desc=desc, total=probes * fits_per_probe(opts["l2s"]), unit="fit")

  results = {"workdir": paths.absolute(workdir),
             "step": ckpt_lib.read_meta(workdir, step)["step"], "model": cfg.to_dict(),
             "data": dict(config.data), "reading": config.reading,
             "n_train": len(labels["train"]), "n_test": len(labels["test"])}
  with fitting(f"probing {len(layers)} layers", len(layers)) as bar:
    table = results["pretrained"] = probe_layers(load_layer(""), layers, on_fit=bar.update,
                                                 **opts)
  best = table["best_layer"]
  summary = {"best_layer": best, "pretrained": table["best_accuracy"]}
  logging.info("best layer %d: %.2f%% (by layer: %s)", best, 100 * table["best_accuracy"],
               ", ".join(f"{l} {100 * r['accuracy']:.2f}%" for l, r in table["layers"].items()))
  if config.concat_k > 1 and len(layers) == cfg.n_layer + 1:
    with fitting(f"probing {config.concat_k} layers concatenated", 1) as bar:
      results["concat"] = concat_layers(load_layer(""), best, config.concat_k, cfg.n_layer,
                                        on_fit=bar.update, **opts)
    summary["concat"] = results["concat"]["accuracy"]
  if config.low_data.sizes:
    with fitting(f"low-data probes of layer {best}",
                 len(config.low_data.sizes) * config.low_data.seeds) as bar:
      results["low_data"] = low_data_probe(*load_layer("")(best),
                                           sizes=tuple(config.low_data.sizes),
                                           seeds=config.low_data.seeds,
                                           balanced=config.low_data.balanced,
                                           on_fit=bar.update, **opts)
  curves = {"pretrained": {l: r["accuracy"] for l, r in table["layers"].items()}}
  flat = {}
  if baselines:
    with fitting("baselines: random init, pixels", len(layers) + len(PIXEL_KINDS)) as bar:
      random = probe_layers(load_layer("random_"), layers, on_fit=bar.update, **opts)
      results["baselines"] = {"random_init": random}
      curves["random init"] = {l: r["accuracy"] for l, r in random["layers"].items()}
      summary["random_init"] = random["best_accuracy"]
      for kind in PIXEL_KINDS:
        r = results["baselines"][f"pixels_{kind}"] = linear_probe(*load(f"pixels_{kind}"),
                                                                  on_fit=bar.update, **opts)
        flat[f"pixels ({kind})"] = summary[f"pixels_{kind}"] = r["accuracy"]
  results["summary"] = summary
  write_json(paths.path(out_dir) / "results.json", results)
  plot_accuracy(paths.path(out_dir) / "accuracy_by_layer.png", curves, flat)
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
    (out_dir / "features").rmtree()
    rows.append({"step": step, "probe_accuracy": table["best_accuracy"],
                 "probe_layer": table["best_layer"],
                 **{f"probe_accuracy_layer{l:02d}": r["accuracy"]
                    for l, r in table["layers"].items()},
                 **({"eval_loss": losses[step]} if step in losses else {})})
  write_json(root / "checkpoints.json", rows)
  if missing := [r["step"] for r in rows if "eval_loss" not in r]:
    logging.warning("metrics.jsonl of %s has no held-out loss at steps %s: they are left out "
                    "of probe_vs_loss.png", workdir, missing)
  if plotted := [r for r in rows if "eval_loss" in r]:
    plot_probe_vs_loss(root / "probe_vs_loss.png", plotted)
  return rows


# -- probes during pretraining ----------------------------------------------------------------

def spread_layers(n_layer: int) -> tuple[int, ...]:
  """Layers at a quarter, half, three quarters and all of the depth (n_layer = ln_f output)."""
  return tuple(sorted({round(f * n_layer) for f in (0.25, 0.75, 1.0)} | {n_layer // 2}))


def _local_batches(config, split: str, palette, n_px: int) -> list[dict]:
  """This process's share of a probe split, read once: eval batches of config.batch_size."""
  return list(_checked_batches(config, split, palette, n_px, config.batch_size))


def make_evaluator(ecfg, config, cfg: model_lib.IGPTConfig, palette, mesh) -> Callable | None:
  """The linear probe as a periodic evaluator of the training loop; None when ecfg.every = 0.

  ecfg (config.evals.probe; fields in experiments/base.py): every, train_split / eval_split
  (splits of config.data, the training config's: a small labelled subset, read once here),
  layers (empty: `spread_layers`), reading, l2s. Returns
  fn(params, step) -> scalars: `probe_accuracy` (held-out, best layer), `probe_layer`,
  `probe_accuracy_layerNN` per layer, `probe_seconds`, and `probe_time_fraction` (of the wall
  time since the previous call, this one included). Call it
  under the training mesh: every process extracts its rows of each batch with the params where
  they lie, the features are gathered, and every process fits the same probes (process 0 logs).
  """
  if not ecfg.every:
    return None
  layers = tuple(ecfg.layers) or spread_layers(cfg.n_layer)
  model_lib.check_layers(cfg, layers)
  reading, l2s = ecfg.reading, tuple(ecfg.l2s)
  splits = {"train": _local_batches(config, ecfg.train_split, palette, cfg.n_px),
            "test": _local_batches(config, ecfg.eval_split, palette, cfg.n_px)}

  fn = features_fn(cfg, layers, reading)

  def features(params, batch):  # labels and valid ride along, split like the features
    batch = sharding_lib.shard_batch(batch, mesh)
    return {"layers": fn(params, batch["tokens"]), "labels": batch["labels"],
            "valid": batch["valid"]}

  def extract(params, batches):  # -> ({layer: [N, D]}, labels [N]), valid rows of every process
    # All batches are dispatched before any is fetched (a subset's features are small); the
    # gather is collective, so every process takes part.
    outs = multihost_utils.process_allgather(
        [features(params, b) for b in batches], tiled=True)
    valid = np.concatenate([o["valid"] for o in outs])
    return ({l: np.concatenate([o["layers"][l] for o in outs])[valid] for l in layers},
            np.concatenate([o["labels"] for o in outs])[valid])

  last_end = [time.perf_counter()]

  def evaluate(params, step: int) -> dict:
    start = time.perf_counter()
    (train_x, train_y), (test_x, test_y) = (extract(params, splits[s]) for s in ("train", "test"))
    acc = {l: linear_probe(train_x[l], train_y, test_x[l], test_y, l2s=l2s)["accuracy"]
           for l in layers}
    best = max(acc, key=acc.get)
    end = time.perf_counter()
    scalars = {"probe_accuracy": acc[best], "probe_layer": best,
               **{f"probe_accuracy_layer{l:02d}": a for l, a in acc.items()},
               "probe_seconds": end - start,
               "probe_time_fraction": (end - start) / (end - last_end[0])}
    last_end[0] = end
    if jax.process_index() == 0:
      logging.info("step %d probe: best layer %d %.2f%% (%s) in %.1f s, %.0f%% of the time",
                   step, best, 100 * acc[best],
                   " ".join(f"{l}:{100 * a:.1f}" for l, a in acc.items()), end - start,
                   100 * scalars["probe_time_fraction"])
    return scalars

  return evaluate


def _probe_rows(workdir: str) -> list[dict]:
  """metrics.jsonl rows holding both a probe and a held-out loss (last record of each step)."""
  rows = metrics_lib.read(workdir)
  return [r for r in rows.values() if "probe_accuracy" in r and "eval_loss" in r]


def plot_probe_vs_loss(path: str, rows: Sequence[Mapping]) -> None:
  """The paper's Figure 3: held-out probe accuracy against held-out loss, one line per layer.

  rows: metrics records with eval_loss and probe_accuracy_layerNN. The loss axis runs from high
  to low, so training moves left to right; each point of the best layer is labelled by its step.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  keys = sorted({k for r in rows for k in r if k.startswith("probe_accuracy_layer")})
  loss = [r["eval_loss"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  for key in keys:
    ax.plot(loss, [100 * r[key] for r in rows], marker="o", label=f"layer {int(key[-2:])}")
  for r in rows:
    ax.annotate(str(r["step"]), (r["eval_loss"], 100 * r["probe_accuracy"]), fontsize=7,
                textcoords="offset points", xytext=(0, 5), ha="center")
  ax.invert_xaxis()
  ax.set_xlabel("held-out generative loss (nats/token)")
  ax.set_ylabel("held-out linear probe accuracy (%)")
  ax.set_title("probe accuracy over training (labels: step)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.write_with(path, lambda f: fig.savefig(f, dpi=120, format="png"))
  plt.close(fig)


def write_probe_vs_loss(workdir: str) -> str | None:
  """Draws workdir/probe_vs_loss.png from the evaluator's rows; None when there are none."""
  rows = _probe_rows(workdir)
  if not rows:
    return None
  path = os.fspath(paths.path(workdir) / "probe_vs_loss.png")
  plot_probe_vs_loss(path, rows)
  return path
