r"""Converts released iGPT weights (Hugging Face or OpenAI's TF release) to an igpt_jax checkpoint.

  python -m launch.convert --hf_dir=path/to/imagegpt-small --workdir=/tmp/igpt_s
  python -m launch.convert --tf_checkpoint=s/model.ckpt-1000000 \
      --palette=kmeans_centers.npy --workdir=/tmp/igpt_s

`--hf_dir` is laid out as the hub ships `openai/imagegpt-{small,medium,large}`: `config.json`,
`model.safetensors` or `pytorch_model.bin` (the latter needs torch), and
`preprocessor_config.json` whose `clusters` are the palette. The workdir gets a checkpoint that
`igpt_jax.checkpoint.load` (and so launch/sample.py, probe.py, finetune.py) reads, plus the
palette as `palette.npy`. `--tf_checkpoint` reads OpenAI's own release
(github.com/openai/image-gpt: `download.py` fetches `model.ckpt-1000000.*` and
`kmeans_centers.npy`, the palette); reading it needs tensorflow (the `data` extra). Every path
may be local or in a bucket (gs://).
"""

# pylint: disable=wrong-import-position
from igpt_jax import console

console.setup()  # first, before anything imports jax: see console.setup

from absl import app
from absl import flags
from absl import logging

from igpt_jax import checkpoint
from igpt_jax import convert
from igpt_jax import palette as palette_lib
from igpt_jax import paths
from igpt_jax.model import param_count

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face ImageGPT checkpoint directory.")
_TF_CHECKPOINT = flags.DEFINE_string("tf_checkpoint", None,
                                     "Or OpenAI's TF checkpoint prefix (model.ckpt-1000000).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the igpt_jax checkpoint.")
_PALETTE = flags.DEFINE_string("palette", None, ".npy palette (512, 3) in [-1, 1]: needed with "
                               "--tf_checkpoint (kmeans_centers.npy) and for a --hf_dir without "
                               "preprocessor_config.json.")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", False, "Store the blocks stacked for nn.scan.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if (_HF_DIR.value is None) == (_TF_CHECKPOINT.value is None):
    raise app.UsageError("give exactly one of --hf_dir and --tf_checkpoint")
  if _HF_DIR.value:
    source = _HF_DIR.value
    with console.status(f"reading and converting {source}"):
      state_dict, hf_config, palette = convert.read_hf_dir(source)
      cfg, params = convert.from_hf(state_dict, hf_config, scan_layers=_SCAN_LAYERS.value)
  else:
    source, palette = _TF_CHECKPOINT.value, None
    with console.status(f"reading and converting {source}"):
      cfg, params = convert.from_openai(convert.read_tf_checkpoint(source),
                                        scan_layers=_SCAN_LAYERS.value)
  if _PALETTE.value:
    palette = palette_lib.load_palette(_PALETTE.value)
  if palette is None:
    raise app.UsageError(f"{source} carries no palette; pass --palette=FILE.npy "
                         "(kmeans_centers.npy for OpenAI's release)")
  palette = palette_lib.check_palette(palette, k=cfg.vocab_size)
  logging.info("converted %s: %s, %.1fM parameters", source, cfg, param_count(cfg) / 1e6)
  with console.status(f"writing the checkpoint to {_WORKDIR.value}"):
    checkpoint.save_params(_WORKDIR.value, cfg, params, palette)
  palette_lib.save_palette(paths.path(_WORKDIR.value) / "palette.npy", palette)
  logging.info("wrote %s", _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
