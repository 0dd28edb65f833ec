"""Shared helpers for tests that compare against transformers' PyTorch CLIP."""

import dataclasses
import functools
import gzip
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=4)
def hf_model_and_params(preset: str, seed: int = 0, layers: int | None = None):
    """A random transformers CLIPModel and the same weights converted to our tree.

    `layers` cuts both towers to that many blocks (every other dimension stays the preset's)."""
    import torch
    from transformers import CLIPModel

    from fiseclip_jax.clip.config import get_config
    from fiseclip_jax.clip.params import from_hf_state_dict

    cfg = get_config(preset)
    if layers is not None:
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, layers=layers),
                          text=dataclasses.replace(cfg.text, layers=layers))
    torch.manual_seed(seed)
    model = CLIPModel(cfg.to_hf_config()).eval()
    # HF initialises LayerNorms to identity and biases to zero: randomise them so that
    # a swapped scale/bias or a missing bias cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    params = jax.tree.map(jnp.asarray, from_hf_state_dict(model.state_dict(), cfg))
    return model, params, cfg


def random_pixels(batch, size, seed=0):
    return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


TOKENIZER_FILES = Path(__file__).resolve().parent / "fixtures" / "clip_tokenizer"


def hf_clip_tokenizer(folder: Path):
    """transformers' CLIPTokenizer on the committed OpenAI vocabulary files (unpacked into `folder`)."""
    from transformers import CLIPTokenizer

    for name in ("vocab.json", "merges.txt"):
        (Path(folder) / name).write_bytes(gzip.decompress((TOKENIZER_FILES / f"{name}.gz").read_bytes()))
    # transformers 5: CLIPTokenizer(vocab_file=..., merges_file=...) silently gives a
    # 3-token tokenizer; from_pretrained on the folder reads vocab.json/merges.txt.
    return CLIPTokenizer.from_pretrained(str(folder))
