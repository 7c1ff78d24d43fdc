"""A run directory: its layout, its typed summary, and its SQLite ledger."""
