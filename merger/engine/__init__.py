"""Building merged weights: the resident in-place engine and mergekit's reference path."""
