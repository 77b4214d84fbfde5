r"""iGPT-XL on ImageNet 64x64, the paper's best linear probe (72.0%): five layers concatenated
around the best one, SGD streamed from bfloat16 shards.

  python launch/probe.py --config experiments/probe_imagenet_xl.py --workdir gs://B/igpt_xl

Only the middle half of the 60 blocks is extracted (layers 15..45: where the paper's probe
curves peak): all 61 taps of 1.28M images would be 480 GB of bfloat16 features. The five-layer
concatenation is 15,360 wide; each (lr, l2) of the grid holds its classifier and momentum, 2 x
61 MB, on every chip.
"""

from experiments import probe_imagenet


def get_config():
  c = probe_imagenet.get_config("64")
  c.layers = tuple(range(15, 46))
  c.concat_k = 5
  c.sgd.batch_size = 2048
  return c
