"""Image GPT (Chen et al., 2020) in JAX / Flax: pretrain, probe, fine-tune and sample.

Importing the package, or any module of it, changes nothing in the process: no environment
variable, file descriptor, hook or log filter. What a launch script sets up for a clean console
(`console.setup`) it does itself, as its first statement.
"""
