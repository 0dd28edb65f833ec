"""Every CLIP preset against transformers' PyTorch CLIPModel (random weights), at 2 blocks per tower.

Each preset keeps its real widths, heads, MLP size, patch size, embedding size and activation; only
the depth is cut (the blocks are all alike and `test_clip_parity.py` runs ViT-B/16 at full depth) and
the input is a non-native size smaller than the native one, so the position grid is resized (bicubic,
transformers' `interpolate_pos_encoding`) on every preset. The published architecture numbers are
checked separately against the preset table.
"""

import chex
import numpy as np
import pytest

from fiseclip_jax.clip.config import PRESETS, get_config

torch = pytest.importorskip("torch")

from clip_reference import hf_model_and_params, random_pixels  # noqa: E402
from test_clip_parity import token_batch, torch_vision  # noqa: E402

from fiseclip_jax import encode_image, encode_text  # noqa: E402

TOL = 1e-5
DEPTH = 2

# Non-native input sizes: grid = size // patch differs from the native grid on every preset.
SIZES = {"ViT-B/32": 160, "ViT-B/16": 160, "ViT-L/14": 126, "ViT-L/14@336": 154, "ViT-B-16-plus-240": 176}

# The published architectures (OpenAI CLIP's model table; OpenCLIP's ViT-B-16-plus-240.json):
# embed, (vision width, layers, heads, patch, native size), (text width, layers, heads), activation.
PUBLISHED = {
    "ViT-B/32": (512, (768, 12, 12, 32, 224), (512, 12, 8), "quick_gelu"),
    "ViT-B/16": (512, (768, 12, 12, 16, 224), (512, 12, 8), "quick_gelu"),
    "ViT-L/14": (768, (1024, 24, 16, 14, 224), (768, 12, 12), "quick_gelu"),
    "ViT-L/14@336": (768, (1024, 24, 16, 14, 336), (768, 12, 12), "quick_gelu"),
    "ViT-B-16-plus-240": (640, (896, 12, 14, 16, 240), (640, 12, 10), "gelu"),
}


def test_every_full_size_preset_has_a_parity_case():
    full = {name for name in PRESETS if not name.startswith("tiny")}
    assert full == set(SIZES) == set(PUBLISHED)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_table_is_the_published_architecture(preset):
    cfg = get_config(preset)
    embed, (vw, vl, vh, patch, size), (tw, tl, th), act = PUBLISHED[preset]
    v, t = cfg.vision, cfg.text
    assert (cfg.embed_dim, cfg.act) == (embed, act)
    assert (v.width, v.layers, v.heads, v.patch_size, v.image_size, v.mlp_dim) == (vw, vl, vh, patch, size, 4 * vw)
    assert (t.width, t.layers, t.heads, t.mlp_dim, t.vocab_size, t.context_length) == (tw, tl, th, 4 * tw, 49408, 77)


@pytest.mark.slow  # 5 to 26 s a preset on the 2-core machine
@pytest.mark.parametrize("preset", sorted(SIZES))
def test_image_tower_at_two_blocks(preset):
    model, params, cfg = hf_model_and_params(preset, layers=DEPTH)
    size = SIZES[preset]
    grid = size // cfg.vision.patch_size
    assert size % cfg.vision.patch_size == 0 and grid != cfg.vision.grid  # the position grid is resized
    assert model.config.vision_config.hidden_act == cfg.act == PUBLISHED[preset][3]
    pixels = random_pixels(2, size, seed=1)
    ref, ref_embeds = torch_vision(model, pixels)
    with torch.no_grad():
        vm = model.vision_model
        ref_patch = model.visual_projection(vm.post_layernorm(ref.last_hidden_state[:, 1:])).numpy()
    out = encode_image(params, cfg, pixels, layers=(1, 2))
    assert out["block_tokens"][2].shape == (2, 1 + grid * grid, cfg.vision.width)
    chex.assert_trees_all_close(out["block_tokens"], {layer: ref.hidden_states[layer].numpy() for layer in (1, 2)},
                                atol=TOL, rtol=0)
    chex.assert_trees_all_close(out["image_embeds"], ref_embeds, atol=TOL, rtol=0)
    chex.assert_trees_all_close(out["patch_embeds"], ref_patch, atol=TOL, rtol=0)
    assert np.abs(ref_embeds).max() > 0.05  # not a vanishing output


@pytest.mark.slow  # 7 to 10 s a preset
@pytest.mark.parametrize("preset", sorted(SIZES))
def test_text_tower_at_two_blocks(preset):
    model, params, cfg = hf_model_and_params(preset, layers=DEPTH)
    ids = token_batch(n=4, seed=2)
    with torch.no_grad():
        ref = model.text_projection(model.text_model(input_ids=torch.from_numpy(ids).long()).pooler_output).numpy()
    got = np.asarray(encode_text(params, cfg, ids))
    assert got.shape == (4, cfg.embed_dim)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    assert np.abs(ref).max() > 0.05
