r"""Converts a Hugging Face ImageGPT checkpoint directory into an igpt_jax checkpoint.

  python -m launch.convert --hf_dir=path/to/imagegpt-small --workdir=/tmp/igpt_s

`--hf_dir` is laid out as the hub ships `openai/imagegpt-{small,medium,large}`: `config.json`,
`model.safetensors` or `pytorch_model.bin` (the latter needs torch), and
`preprocessor_config.json` whose `clusters` are the palette. The workdir gets a checkpoint that
`igpt_jax.checkpoint.load` (and so launch/sample.py, probe.py, finetune.py) reads, plus the
palette as `palette.npy`.
"""

import os

from absl import app
from absl import flags
from absl import logging

from igpt_jax import checkpoint
from igpt_jax import convert
from igpt_jax import palette as palette_lib
from igpt_jax.model import param_count

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face ImageGPT checkpoint directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the igpt_jax checkpoint.")
_PALETTE = flags.DEFINE_string("palette", None, ".npy palette (512, 3) in [-1, 1], for a "
                               "directory without preprocessor_config.json.")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", False, "Store the blocks stacked for nn.scan.")


def main(argv):
  del argv
  state_dict, hf_config, palette = convert.read_hf_dir(_HF_DIR.value)
  if _PALETTE.value:
    palette = palette_lib.load_palette(_PALETTE.value)
  if palette is None:
    raise ValueError(f"{_HF_DIR.value} has no preprocessor_config.json with the palette "
                     "(`clusters`); pass --palette=FILE.npy")
  cfg, params = convert.from_hf(state_dict, hf_config, scan_layers=_SCAN_LAYERS.value)
  logging.info("converted %s: %s, %.1fM parameters", _HF_DIR.value, cfg, param_count(cfg) / 1e6)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  checkpoint.save_params(_WORKDIR.value, cfg, params, palette)
  palette_lib.save_palette(os.path.join(_WORKDIR.value, "palette.npy"), palette)
  logging.info("wrote %s", _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["hf_dir", "workdir"])
  app.run(main)
