"""Designing a pool for a memory budget: which specialists to merge together and which to keep apart, so
that a router over at most K resident models comes closest to routing over all of them."""
