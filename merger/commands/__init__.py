"""Sub-commands of the `merger` CLI, one module per area.

Each module defines `register(subparsers)` and keeps heavy imports (torch, lm-eval...) inside
its handlers so that `merger --help` stays fast.
"""
