"""Foundations every stage uses: the user-facing error, safe YAML, atomic files, bundled data."""
