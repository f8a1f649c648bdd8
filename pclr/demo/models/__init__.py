"""The mini LLaVA of the demo (SmolLM2-135M-Instruct + a small vision tower) and its helpers."""
