"""Sampling pipelines: plain prompts with concepts (`MixOfShowPipeline`); regional sampling builds on it."""

from .pipeline_mixofshow import SCHEDULERS, MixOfShowPipeline

__all__ = ["SCHEDULERS", "MixOfShowPipeline"]
