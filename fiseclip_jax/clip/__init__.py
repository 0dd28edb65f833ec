"""CLIP towers, configs, tokenizer and weight conversion."""
