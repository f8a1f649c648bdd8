"""Model builders: a tiny random-config LLaVA / causal LM (tests) and the pretrained mini LLaVA (main job)."""
from pclr.models.bundle import ModelBundle

__all__ = ["ModelBundle"]
