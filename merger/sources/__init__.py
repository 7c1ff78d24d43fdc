"""A recipe's sources as local checkpoints: resolving references, checking they merge, lineage."""
