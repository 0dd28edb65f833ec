"""CLIP towers (flax.linen modules), configs, tokenizer and weight conversion."""

from .model import CLIP, TextTransformer, VisionTransformer

__all__ = ["CLIP", "TextTransformer", "VisionTransformer"]
