"""Image GPT (Chen et al., 2020) in JAX / Flax: pretrain, probe, fine-tune and sample.

Importing the package imports jax first, inside `without_driver_notices`, so that a launch
script's console starts clean on hosts that carry the CUDA compiler plugin for GPU plans (the
gpu-plan extra) but no GPU; `console.setup` registers jax's plugins inside it too.
"""

import contextlib
import os
import sys
import tempfile

# What the CUDA plugin's libraries log when they load on a host without the NVIDIA driver, and
# the notice absl's C++ logging puts before each line logged ahead of its initialisation.
_NO_DRIVER = "Could not find cuda drivers on your machine"
_ABSL_EARLY = "WARNING: All log messages before absl::InitializeLog() is called"


def _driver_notice(lines: list, i: int) -> bool:
  return _NO_DRIVER in lines[i] or (lines[i].startswith(_ABSL_EARLY) and i + 1 < len(lines)
                                    and _NO_DRIVER in lines[i + 1])


@contextlib.contextmanager
def without_driver_notices():
  """Drops the CUDA plugin's no-driver notices from stderr while the block runs.

  Importing jax and registering the plugin load CUDA libraries whose stub reports, from C++
  past any logging filter, that there is no GPU driver: true and expected on a CPU host. Those
  lines (and absl's notice before each) are dropped; whatever else reaches stderr meanwhile is
  passed on when the block ends.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(l for i, l in enumerate(lines) if not _driver_notice(lines, i)))
      sys.stderr.flush()


if "jax" not in sys.modules:
  with without_driver_notices():
    import jax  # pylint: disable=unused-import
