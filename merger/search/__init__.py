"""The CMA-ES ask/tell loop and the item strategies (full, racing, anchors)."""
