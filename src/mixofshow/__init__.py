"""mixofshow: decentralized multi-concept customization of text-to-image diffusion models (Mix-of-Show)."""

from .concept_file import ConceptFile, load_concept, save_concept
from .errors import MixOfShowError
from .pipelines import MixOfShowPipeline

__all__ = ["ConceptFile", "MixOfShowError", "MixOfShowPipeline", "load_concept", "save_concept"]
__version__ = "0.1.0"
