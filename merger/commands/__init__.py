"""Sub-commands of the `merger` CLI, one module per area.

Each module defines `register(subparsers)` and keeps heavy imports (torch, lm-eval...) inside
its handlers so that `merger --help` stays fast.
"""

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
