"""Experiment configs: plain `get_config()` files for the launch scripts' `--config` flags.

Installed with igpt_jax (setup.cfg), so an experiment can start from another
(`from experiments import base`) wherever the script runs, without path edits.
"""
