"""mixofshow: decentralized multi-concept customization of text-to-image diffusion models (Mix-of-Show)."""

from importlib import import_module

from .errors import MixOfShowError

__version__ = "0.1.0"

# Heavy modules (torch, diffusers) load on first use, so `mixofshow --help` is instant.
_LAZY = {
    "ConceptFile": "concept_file",
    "load_concept": "concept_file",
    "save_concept": "concept_file",
    "MixOfShowPipeline": "pipelines",
    "TrainConfig": "config",
    "load_train_config": "config",
    "train": "train",
}
__all__ = [
    "ConceptFile",
    "MixOfShowError",
    "MixOfShowPipeline",
    "TrainConfig",
    "load_concept",
    "load_train_config",
    "save_concept",
    "train",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mixofshow' has no attribute {name!r}")
