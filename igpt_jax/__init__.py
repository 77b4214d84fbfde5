"""Image GPT (Chen et al., 2020) in JAX / Flax: pretrain, probe, fine-tune and sample.

Importing the package imports jax first (`_import_jax`), so that a launch script's console
starts clean on hosts that carry the CUDA compiler plugin for GPU plans but no GPU.
"""

import os
import sys
import tempfile

# What the CUDA plugin's kernels log when jax imports them on a host without the NVIDIA driver,
# and the notice absl's C++ logging puts before each line logged ahead of its initialisation.
_NO_DRIVER = "Could not find cuda drivers on your machine"
_ABSL_EARLY = "WARNING: All log messages before absl::InitializeLog() is called"


def _driver_notice(lines: list, i: int) -> bool:
  return _NO_DRIVER in lines[i] or (lines[i].startswith(_ABSL_EARLY) and i + 1 < len(lines)
                                    and _NO_DRIVER in lines[i + 1])


def _import_jax() -> None:
  """Imports jax with the CUDA plugin's no-driver notices dropped from stderr.

  With jax-cuda12-plugin installed for compile-only GPU plans (the gpu-plan extra), importing
  jax loads CUDA kernels whose stub reports, three times and from C++ past any logging filter,
  that there is no GPU driver: true and expected on a CPU host. Those lines (and absl's notice
  before each) are dropped; whatever else the import writes to stderr is passed on.
  """
  if "jax" in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import jax  # pylint: disable=import-outside-toplevel,unused-import
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(l for i, l in enumerate(lines) if not _driver_notice(lines, i)))
      sys.stderr.flush()


_import_jax()
