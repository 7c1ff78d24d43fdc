"""Scoring a resident model with lm-eval: the bridge, task data checks, fitness and its items."""
