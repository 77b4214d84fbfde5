r"""A seconds-long run for tests and smoke checks: 4x4 images, 16 colours, 2 layers of width 32.

  python -m launch.train --config experiments/tiny_test.py --workdir /tmp/igpt_smoke \
    --config.data.name=path/to/images.npz
"""

import os

from experiments import base


def get_config():
  c = base.get_config()
  c.data = dict(name=base.cifar10(), train_split="train[:48]", eval_split="train[48:64]",
                augment="none")  # a key, so that tests may set it from the command line
  c.model.update(n_px=4, n_layer=2, n_embd=32, n_head=2, vocab_size=16)
  # Every action every few steps, so a short run exercises logging, evals and resumes.
  c.total_steps = 8
  c.batch_size = 8
  c.lr = 1e-2
  c.warmup_steps = 2
  c.log_every = 1
  c.eval_every = 4
  c.checkpoint_every = 2
  c.keep_checkpoints = 20
  # The test suite's cache when the suite runs it (tests/conftest.py sets the variable), else
  # none: a smoke check compiles from scratch, whatever ran on the machine before.
  c.compilation_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  return c
