"""SPEC §2 attention variants against a direct torch implementation of each formula.

The oracle walks transformers' PyTorch layers by hand (q_proj, k_proj, ... of each
layer), so it shares no code with `encode_image`.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from clip_reference import hf_model_and_params, random_pixels  # noqa: E402

from fiseclip_jax import encode_image  # noqa: E402
from fiseclip_jax.clip.attention import attend  # noqa: E402
from fiseclip_jax.clip.layers import ResidualBlock  # noqa: E402


def heads(x, n):
    b, t, w = x.shape
    return x.reshape(b, t, n, w // n).transpose(1, 2)


def attn_out(layer, u, mode, n_heads):
    a = layer.self_attn
    q, k, v = heads(a.q_proj(u), n_heads), heads(a.k_proj(u), n_heads), heads(a.v_proj(u), n_heads)
    s = q.shape[-1] ** -0.5
    sm = lambda x, y: torch.softmax(x @ y.transpose(-1, -2) * s, dim=-1)  # noqa: E731
    if mode == "vv":
        o = sm(v, v) @ v
    elif mode == "qq":
        o = sm(q, q) @ v
    elif mode == "qq+kk":
        o = (sm(q, q) + sm(k, k)) @ v
    else:  # identity
        o = v
    b, h, t, d = o.shape
    return a.out_proj(o.transpose(1, 2).reshape(b, t, h * d))


def reference_local(model, pixels, mode, n_local, n_heads):
    vm = model.vision_model
    with torch.no_grad():
        x = vm.embeddings(torch.from_numpy(pixels).permute(0, 3, 1, 2), interpolate_pos_encoding=True)
        x = vm.pre_layrnorm(x)
        layers = list(vm.encoder.layers)
        first = len(layers) - n_local
        x_loc = None
        for i, layer in enumerate(layers):
            if i >= first:
                if x_loc is None:
                    x_loc = x
                if mode == "vv":  # dual path: input is LN1 of the standard stream, own residual, no FFN
                    x_loc = x_loc + attn_out(layer, layer.layer_norm1(x), "vv", n_heads)
                elif mode == "qq+kk":  # residual and FFN kept
                    y = x_loc + attn_out(layer, layer.layer_norm1(x_loc), mode, n_heads)
                    x_loc = y + layer.mlp(layer.layer_norm2(y))
                else:  # qq, identity: residual and FFN removed
                    x_loc = attn_out(layer, layer.layer_norm1(x_loc), mode, n_heads)
            y = layer(x, None)
            x = y[0] if isinstance(y, tuple) else y
        proj = model.visual_projection(vm.post_layernorm(x_loc[:, 1:]))
        std = model.visual_projection(vm.post_layernorm(x[:, 1:]))
    return proj.numpy(), std.numpy()


@pytest.mark.parametrize("mode", ["vv", "qq", "qq+kk", "identity"])
@pytest.mark.parametrize("n_local", [1, 2, 4])
def test_local_modes_match_formula(mode, n_local):
    model, params, cfg = hf_model_and_params("tiny")
    pixels = random_pixels(2, 40, seed=3)
    ref_local, ref_std = reference_local(model, pixels, mode, n_local, cfg.vision.heads)
    out = encode_image(params, cfg, pixels, local=mode, local_blocks=n_local)
    assert np.abs(np.asarray(out["local_embeds"]) - ref_local).max() <= 1e-5
    # the standard path is never altered by the local path
    assert np.abs(np.asarray(out["patch_embeds"]) - ref_std).max() <= 1e-5
    # and the local tokens really differ from the standard ones
    assert np.abs(ref_local - ref_std).max() > 1e-3


def test_vv_all_blocks_starts_from_ln_pre():
    """AnoVL (SPEC §8): with every block modified, x_vv starts from the ln_pre output."""
    model, params, cfg = hf_model_and_params("tiny")
    pixels = random_pixels(1, 32, seed=5)
    ref_local, _ = reference_local(model, pixels, "vv", cfg.vision.layers, cfg.vision.heads)
    out = encode_image(params, cfg, pixels, local="vv", local_blocks=cfg.vision.layers)
    assert np.abs(np.asarray(out["local_embeds"]) - ref_local).max() <= 1e-5


def test_bad_arguments():
    _, params, cfg = hf_model_and_params("tiny")
    with pytest.raises(ValueError, match="unknown local mode"):
        encode_image(params, cfg, random_pixels(1, 32), local="kk")
    with pytest.raises(ValueError, match="divisible by patch"):
        encode_image(params, cfg, random_pixels(1, 36))
    with pytest.raises(ValueError, match="outside 1..4"):
        encode_image(params, cfg, random_pixels(1, 32), layers=(0,))


@pytest.mark.parametrize("causal", [False, True])
def test_attend_is_scaled_dot_product_attention(causal):
    """The kernel seam against torch's own scaled_dot_product_attention ([B, H, T, dh] there)."""
    rng = np.random.RandomState(7)
    a, b, v = (rng.randn(2, 9, 3, 8).astype(np.float32) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(t).transpose(1, 2) for t in (a, b, v)), is_causal=causal, scale=0.3).transpose(1, 2)
    np.testing.assert_allclose(np.asarray(attend(a, b, v, scale=0.3, causal=causal)), ref.numpy(), atol=1e-6)


def test_residual_block_module_is_the_torch_layer():
    """One `ResidualBlock`, applied by itself to its slice of the tree, against transformers' layer 2."""
    model, params, cfg = hf_model_and_params("tiny")
    v = cfg.vision
    block = ResidualBlock(v.width, v.heads, v.mlp_dim, cfg.act, cfg.layer_norm_eps)
    x = np.random.RandomState(8).randn(2, 17, v.width).astype(np.float32)
    with torch.no_grad():
        y = model.vision_model.encoder.layers[2](torch.from_numpy(x), None)
    ref = (y[0] if isinstance(y, tuple) else y).numpy()
    got = block.apply({"params": params["vision"]["transformer"]["blocks_2"]}, x)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
    # and its second path in mode qq (ClearCLIP) is the formula of the SPEC §2 table
    layer = model.vision_model.encoder.layers[2]
    with torch.no_grad():
        want = attn_out(layer, layer.layer_norm1(torch.from_numpy(x)), "qq", v.heads).numpy()
    got = block.apply({"params": params["vision"]["transformer"]["blocks_2"]}, x, x, "qq", method="local")
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
