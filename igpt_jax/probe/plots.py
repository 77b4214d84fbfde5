"""Probe figures: accuracy by layer, and the paper's Figure 3 (probe accuracy against the
held-out generative loss over training) from metrics.jsonl."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from igpt_jax import metrics as metrics_lib
from igpt_jax import paths


def plot_accuracy(path: str, curves: Mapping[str, Mapping[int, float]],
                  baselines: Mapping[str, float] | None = None, *,
                  chosen: Mapping[str, int] | None = None,
                  points: Mapping[str, tuple[float, float]] | None = None) -> None:
  """PNG of probe accuracy vs layer, one line per curve, baselines as horizontal lines.

  chosen: {curve: the layer chosen on validation}, ringed; points: {label: (layer, accuracy)},
  single results drawn as stars (the attentive probe at its layer, or the mean of its layers).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
  for i, (name, acc) in enumerate(curves.items()):
    layers = sorted(acc)
    ax.plot(layers, [100 * acc[l] for l in layers], marker="o", color=f"C{i}", label=name)
    if chosen and name in chosen:
      ringed = any(l.get_label() == "ringed: chosen on validation" for l in ax.lines)
      ax.plot([chosen[name]], [100 * acc[chosen[name]]], marker="o", markersize=13,
              fillstyle="none", color=f"C{i}", linestyle="none",
              label="_" if ringed else "ringed: chosen on validation")
  for i, (name, acc) in enumerate((baselines or {}).items()):
    ax.axhline(100 * acc, linestyle="--", color=f"C{i + len(curves)}", label=name)
  for i, (name, (layer, acc)) in enumerate((points or {}).items()):
    ax.plot([layer], [100 * acc], marker="*", markersize=14, linestyle="none",
            color=f"C{i + len(curves) + len(baselines or {})}", label=name)
  ax.set_xlabel("layer (last = ln_f output)")
  ax.set_ylabel("probe accuracy on test (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.write_with(path, lambda f: fig.savefig(f, dpi=120, format="png"))
  plt.close(fig)


def write_json(path: paths.PathLike, obj) -> None:
  paths.write_json(path, obj, indent=2, default=float)


def probe_rows(workdir: str) -> list[dict]:
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
  rows = probe_rows(workdir)
  if not rows:
    return None
  path = os.fspath(paths.path(workdir) / "probe_vs_loss.png")
  plot_probe_vs_loss(path, rows)
  return path
