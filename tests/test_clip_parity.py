"""Stage-by-stage parity of our JAX CLIP with transformers' PyTorch CLIP (random weights)."""

import chex
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from clip_reference import hf_model_and_params, random_pixels  # noqa: E402

from fiseclip_jax import encode_image, encode_text  # noqa: E402
from fiseclip_jax.clip.modeling import embed_image_tokens  # noqa: E402

TOL = 1e-5


def torch_vision(model, pixels):
    with torch.no_grad():
        out = model.vision_model(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            output_hidden_states=True, interpolate_pos_encoding=True,
        )
        return out, model.visual_projection(out.pooler_output).numpy()


# tiny at 184 px: 530 tokens, past attention.DIRECT_MAX_TOKENS (one head at a time, key chunks on CPU)
CASES = [("tiny", 32, (1, 2, 4)), ("tiny", 56, (1, 3)), ("tiny-gelu", 40, (2, 4)), ("tiny", 184, (2, 4)),
         pytest.param("ViT-B/16", 224, (3, 6, 12), marks=pytest.mark.slow), ("ViT-B/16", 288, (6, 12))]


@pytest.mark.parametrize("preset,size,layers", CASES)
def test_image_tower(preset, size, layers):
    model, params, cfg = hf_model_and_params(preset)
    pixels = random_pixels(2, size)
    ref, ref_embeds = torch_vision(model, pixels)
    out = encode_image(params, cfg, pixels, layers=layers)
    # stage 0: patch conv, class token, (resized) position embeddings, ln_pre
    with torch.no_grad():
        vm = model.vision_model
        ref_emb = vm.pre_layrnorm(vm.embeddings(torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                                interpolate_pos_encoding=True)).numpy()
        # patch_embeds: ln_post + proj on the final patch tokens
        ref_patch = model.visual_projection(vm.post_layernorm(ref.last_hidden_state[:, 1:])).numpy()
    chex.assert_trees_all_close(embed_image_tokens(params, cfg, pixels), ref_emb, atol=TOL, rtol=0)
    # hidden_states[l] is the residual stream after block l (1-indexed), as ours
    chex.assert_trees_all_close(out["block_tokens"], {layer: ref.hidden_states[layer].numpy() for layer in layers},
                                atol=TOL, rtol=0)
    chex.assert_trees_all_close(out["image_embeds"], ref_embeds, atol=TOL, rtol=0)
    chex.assert_trees_all_close(out["patch_embeds"], ref_patch, atol=TOL, rtol=0)
    assert out["patch_embeds"].shape == (2, (size // cfg.vision.patch_size) ** 2, cfg.embed_dim)


def token_batch(n=6, seed=0):
    rng = np.random.RandomState(seed)
    ids = np.zeros((n, 77), np.int32)
    for i in range(n):
        length = rng.randint(1, 75)
        ids[i, 0] = 49406
        ids[i, 1:length + 1] = rng.randint(1, 49406, size=length)
        ids[i, length + 1] = 49407
    return ids


@pytest.mark.parametrize("preset", ["tiny", "tiny-gelu", "ViT-B/16"])
def test_text_tower(preset):
    model, params, cfg = hf_model_and_params(preset)
    ids = token_batch()
    with torch.no_grad():
        t = model.text_model(input_ids=torch.from_numpy(ids).long())
        ref = model.text_projection(t.pooler_output).numpy()
    chex.assert_trees_all_close(encode_text(params, cfg, ids), ref, atol=TOL, rtol=0)


def test_logit_scale():
    model, params, _ = hf_model_and_params("tiny")
    assert float(params["logit_scale"]) == pytest.approx(float(model.logit_scale.detach()), abs=0)
