"""The conductor: an OpenAI-compatible HTTP server that routes over a pool with fallback."""
