"""What the trainer takes: the ModelBundle type, and tiny offline random-weight models (tests, examples)."""
from pclr.models.bundle import ModelBundle

__all__ = ["ModelBundle"]
