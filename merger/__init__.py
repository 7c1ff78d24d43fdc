"""merger: evolutionary model merging with mergekit, pycma and lm-eval."""

__version__ = "0.1.0"
