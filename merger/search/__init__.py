"""The CMA-ES ask/tell loop and the item strategies (full, racing, anchors); `reference_loop` is the same
idea on one page, without the production machinery."""
