"""The recipe: its typed schema, loading it, and what merger knows of each mergekit method."""
