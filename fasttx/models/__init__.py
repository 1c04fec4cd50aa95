"""fasttx.models: complete models built from fasttx's layers.

    from fasttx.models import GPT, GPTConfig
"""
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
