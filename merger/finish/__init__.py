"""The end of a run: export of the winner, untuned baselines, final scores, summary and card."""
