"""What a model builder hands to the trainer: the model plus everything needed to turn CoIN samples into inputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelBundle:
    """A model ready for LRP injection and the pieces the data collator needs.

    model: ``LlavaForConditionalGeneration`` (or a Qwen2-VL style model) or a plain causal LM (text-only tasks).
    tokenizer: a ``PreTrainedTokenizerBase`` with a chat template.
    image_size: side of the square RGB input the vision tower expects (None for text-only models).
    image_mean / image_std: per-channel normalisation of pixel values in [0, 1].
    num_image_tokens: placeholder tokens one ``<image>`` expands into (LLaVA: patches (+1 with CLS kept)).
    image_token_id: id of the image placeholder token in the tokenizer (None for text-only models).
    info: free-form provenance for reports (which weights, whether an alignment stage ran, ...).
    """

    model: Any
    tokenizer: Any
    image_size: Optional[int] = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    num_image_tokens: int = 0
    image_token_id: Optional[int] = None
    info: dict = field(default_factory=dict)
