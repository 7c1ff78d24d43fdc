"""The search: `open` opens a run, `loop` asks and tells CMA-ES (its state and checkpoint in `state`)
until `budget` says stop, one `strategies` call scoring each generation (full; racing and anchors
item by item, on `itemwise`, with their arithmetic in `racing` and `anchors`). `reference_loop` is the
same idea on one page, without the production machinery."""
