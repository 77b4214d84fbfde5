"""The training loop's periodic evaluations, built from the config (as big_vision's config.evals).

  Evaluator(name, every, fn, finish)  fn(params, step) -> {name: float or PNG bytes}; finish()
  build(config, cfg, palette, mesh, workdir, eval_batches) -> [Evaluator]
  batch_sums(fn, params, batches, mesh, seed) -> {name: sum over the batches}
  loss_by_pixel_png(loss [n_px, n_px], step) -> PNG bytes
  held_out_accuracy(cfg, params, batches, mesh, k_masks, seed) -> float

`build` makes the loop's own two, then one per entry of config.evals (experiments/base.py):
- "held_out", every config.eval_every: one pass over the eval split for `eval_loss` and
  `eval_bits_per_token`, and when fine-tuning `eval_accuracy` (the loop's best-checkpoint metric)
  from the same batches; from the same pass, the loss by pixel position as an n_px x n_px
  picture, workdir/loss_by_pixel_STEP.png and the TensorBoard image `eval_loss_by_pixel`;
- "samples", every config.sample_every, AR models only: workdir/samples_STEP.png
  (`sample.save_samples`);
- by `type`: "probe" (`probe.make_evaluator`; finish draws workdir/probe_vs_loss.png).
An entry whose maker returns None (e.g. every = 0) is left out.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np

from igpt_jax import checkpoint as ckpt_lib
from igpt_jax import finetune as finetune_lib
from igpt_jax import model as model_lib
from igpt_jax import paths
from igpt_jax import probe as probe_lib
from igpt_jax import sample as sample_lib
from igpt_jax import sharding as sharding_lib
from igpt_jax import steps as steps_lib


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A periodic evaluation: fn(params, step) -> {name: float, or PNG bytes for a TensorBoard
  image}, every `every` steps."""
  name: str
  every: int
  fn: Callable[[Any, int], dict]
  finish: Callable[[], Any] | None = None  # after the run, on every process


def batch_sums(fn: Callable, params, batches: Iterable[dict], mesh, seed: int) -> dict:
  """{name: sum over batches} of fn(params, batch, rng) -> {name: count or sum, a scalar (a
  float back) or an array (float64 back)}.

  Each process passes its rows of every global batch; batch i draws with fold_in(key(seed), i).
  Each batch's sums are fetched before the next is read, so an eval split of any size holds one
  batch on the devices.
  """
  totals = {}
  for i, batch in enumerate(batches):
    out = jax.device_get(fn(params, sharding_lib.shard_batch(batch, mesh),
                            jax.random.fold_in(jax.random.key(seed), i)))
    for k, v in out.items():
      v = np.asarray(v, np.float64)
      totals[k] = totals.get(k, 0.0) + (float(v) if v.ndim == 0 else v)
  return totals


def _accuracy_step(cfg, k_masks: int) -> Callable:
  step = finetune_lib.make_eval_step(cfg, k_masks)
  return lambda params, batch, rng: dict(zip(("correct", "examples"), step(params, batch, rng)))


def held_out_accuracy(cfg: model_lib.IGPTConfig, params, batches, mesh, k_masks: int,
                      seed: int) -> float:
  """Top-1 accuracy of the classifier over labelled batches (padding rows excluded)."""
  sums = batch_sums(_accuracy_step(cfg, k_masks), params, batches, mesh, seed)
  return sums.get("correct", 0.0) / max(sums.get("examples", 0.0), 1.0)


def loss_by_pixel_png(loss, step: int) -> bytes:
  """PNG of the held-out loss by pixel, loss [n_px, n_px] in nats, with a colour bar."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(4.2, 3.6))
  image = ax.imshow(loss, cmap="magma", interpolation="nearest")
  fig.colorbar(image, ax=ax, label="nats")
  if len(loss) <= 8:  # few enough pixels to read each one's figure
    for (i, j), v in np.ndenumerate(loss):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
              color="white" if v < (np.min(loss) + np.max(loss)) / 2 else "black")
  ax.set_title(f"held-out loss by pixel, step {step}\n(mean {np.mean(loss):.4f} nats/token)",
               fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=100, format="png")
  plt.close(fig)
  return buffer.getvalue()


def _held_out(config, cfg, mesh, workdir, eval_batches) -> Evaluator:
  loss_step = steps_lib.make_eval_step(cfg)
  accuracy_step = _accuracy_step(cfg, config.k_masks) if config.init_workdir else None

  def step(params, batch, rng):  # BERT: the loss sees the first vote's mask (finetune.mask_keys)
    out = loss_step(params, batch, rng)
    return out if accuracy_step is None else {**out, **accuracy_step(params, batch, rng)}

  def fn(params, step_):
    sums = batch_sums(step, params, eval_batches(), mesh, config.seed + 1)
    loss = sums.get("loss", 0.0) / max(sums.get("examples", 0.0), 1.0)
    by_pixel = (sums["position_loss"] / np.maximum(sums["position_count"], 1.0)).reshape(
        cfg.n_px, cfg.n_px)  # raster order
    png = loss_by_pixel_png(by_pixel, step_)
    if jax.process_index() == 0:
      (paths.path(workdir) / f"loss_by_pixel_{step_:07d}.png").write_bytes(png)
    out = {"eval_loss": loss, "eval_bits_per_token": loss / steps_lib.LN2,
           "eval_loss_by_pixel": png}
    if accuracy_step is not None:
      out[ckpt_lib.BEST_METRIC] = sums.get("correct", 0.0) / max(sums.get("examples", 0.0), 1.0)
    return out
  return Evaluator("held_out", config.eval_every, fn)


def _samples(config, cfg, palette, mesh, workdir, eval_batches) -> Evaluator | None:
  if cfg.objective != "ar":  # only an autoregressive model samples
    return None
  prompts = []  # the first held-out images, read at the first grid

  def fn(params, step):
    if not prompts:
      prompts.append(next(iter(eval_batches()))["tokens"][:4])
    sample_lib.save_samples(paths.path(workdir) / f"samples_{step:07d}.png", cfg, params,
                            palette, jax.random.fold_in(jax.random.key(config.seed + 2), step),
                            prompts[0], mesh)
    return {}
  return Evaluator("samples", config.sample_every, fn)


def _probe(ecfg, config, cfg, palette, mesh, workdir) -> Evaluator | None:
  fn = probe_lib.make_evaluator(ecfg, config, cfg, palette, mesh)
  if fn is None:
    return None

  def finish():  # process 0 wrote metrics.jsonl
    if jax.process_index() == 0:
      probe_lib.write_probe_vs_loss(workdir)
  return Evaluator("probe", ecfg.every, fn, finish)


KINDS = {"probe": _probe}  # config.evals entries' `type` -> maker


def build(config: ml_collections.ConfigDict, cfg: model_lib.IGPTConfig, palette, mesh,
          workdir: str, eval_batches: Callable[[], Iterable[dict]]) -> list[Evaluator]:
  """The run's evaluators, in the order they run at a step; eval_batches() -> a fresh pass
  over this process's rows of the eval split."""
  evaluators = [_held_out(config, cfg, mesh, workdir, eval_batches),
                _samples(config, cfg, palette, mesh, workdir, eval_batches)]
  for name, ecfg in config.get("evals", {}).items():
    if ecfg.type not in KINDS:
      raise ValueError(f"config.evals.{name}: unknown type {ecfg.type!r}; known: {sorted(KINDS)}")
    evaluators.append(KINDS[ecfg.type](ecfg, config, cfg, palette, mesh, workdir))
  return [e for e in evaluators if e is not None]
