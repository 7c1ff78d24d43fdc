"""`merger report`: a run's HTML report with plots."""
