"""Weight conversion: every source layout -> exactly the parameters of the transformers reference.

Oracle: a random transformers `CLIPModel`, converted by the verified `from_hf_state_dict`.
The same weights are rewritten into the OpenAI / OpenCLIP key layouts (checked against a
torch module built from `nn.MultiheadAttention`, as OpenAI's CLIP is) and written as each
file format; each conversion path must give the reference bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict

import jax
import numpy as np
import pytest

from fiseclip_jax.clip.config import CLIPConfig, TextConfig, VisionConfig, get_config
from fiseclip_jax.clip.convert import (ActivationError, ActivationOverrideWarning, convert_clip, infer_config,
                                       resolve_act)
from fiseclip_jax.clip.params import ConversionError, from_hf_state_dict


def assert_trees_equal(a, b):
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(fa, fb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == np.float32 and y.dtype == np.float32, path
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


# ---------------------------------------------------------------- fixtures (torch)
def _random_hf(cfg: CLIPConfig, seed: int = 0):
    """A transformers CLIPModel with every tensor random (no zero biases, no identity LayerNorms)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg.to_hf_config()).eval()
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    return model, sd


def hf_to_openai(sd, cfg: CLIPConfig):
    """The same tensors in OpenAI CLIP's key layout (fused in_proj, c_fc/c_proj, proj = W.T)."""
    import torch

    o = {}
    for tower, pre, layers in (("vision_model", "visual.", cfg.vision.layers), ("text_model", "", cfg.text.layers)):
        for i in range(layers):
            h, b = f"{tower}.encoder.layers.{i}.", f"{pre}transformer.resblocks.{i}."
            for wb in ("weight", "bias"):
                o[b + f"attn.in_proj_{wb}"] = torch.cat([sd[h + f"self_attn.{n}_proj.{wb}"] for n in "qkv"])
                o[b + f"attn.out_proj.{wb}"] = sd[h + f"self_attn.out_proj.{wb}"]
                o[b + f"ln_1.{wb}"] = sd[h + f"layer_norm1.{wb}"]
                o[b + f"ln_2.{wb}"] = sd[h + f"layer_norm2.{wb}"]
                o[b + f"mlp.c_fc.{wb}"] = sd[h + f"mlp.fc1.{wb}"]
                o[b + f"mlp.c_proj.{wb}"] = sd[h + f"mlp.fc2.{wb}"]
    for wb in ("weight", "bias"):
        o[f"visual.ln_pre.{wb}"] = sd[f"vision_model.pre_layrnorm.{wb}"]
        o[f"visual.ln_post.{wb}"] = sd[f"vision_model.post_layernorm.{wb}"]
        o[f"ln_final.{wb}"] = sd[f"text_model.final_layer_norm.{wb}"]
    o["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    o["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    o["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    o["visual.proj"] = sd["visual_projection.weight"].T
    o["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    o["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    o["text_projection"] = sd["text_projection.weight"].T
    o["logit_scale"] = sd["logit_scale"]
    return {k: v.contiguous().clone() for k, v in o.items()}


def openai_module(cfg: CLIPConfig):
    """A torch module with OpenAI CLIP's attribute hierarchy (clip/model.py), for a real TorchScript archive."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, w, heads, m):
            super().__init__()
            self.attn = nn.MultiheadAttention(w, heads)
            self.ln_1 = nn.LayerNorm(w)
            self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(w, m), gelu=nn.GELU(), c_proj=nn.Linear(m, w)))
            self.ln_2 = nn.LayerNorm(w)

    class Transformer(nn.Module):
        def __init__(self, w, layers, heads, m):
            super().__init__()
            self.resblocks = nn.Sequential(*[Block(w, heads, m) for _ in range(layers)])

    v, t = cfg.vision, cfg.text

    class Visual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, v.width, v.patch_size, v.patch_size, bias=False)
            self.class_embedding = nn.Parameter(torch.zeros(v.width))
            self.positional_embedding = nn.Parameter(torch.zeros(v.grid ** 2 + 1, v.width))
            self.ln_pre = nn.LayerNorm(v.width)
            self.transformer = Transformer(v.width, v.layers, v.heads, v.mlp_dim)
            self.ln_post = nn.LayerNorm(v.width)
            self.proj = nn.Parameter(torch.zeros(v.width, cfg.embed_dim))

    class CLIP(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = Visual()
            self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_dim)
            self.token_embedding = nn.Embedding(t.vocab_size, t.width)
            self.positional_embedding = nn.Parameter(torch.zeros(t.context_length, t.width))
            self.ln_final = nn.LayerNorm(t.width)
            self.text_projection = nn.Parameter(torch.zeros(t.width, cfg.embed_dim))
            self.logit_scale = nn.Parameter(torch.zeros([]))
            self.register_buffer("input_resolution", torch.tensor(v.image_size))
            self.register_buffer("context_length", torch.tensor(t.context_length))
            self.register_buffer("vocab_size", torch.tensor(t.vocab_size))

        def forward(self, x):
            return self.visual.conv1(x) * self.logit_scale.exp()

    return CLIP()


def openai_markers(cfg: CLIPConfig):
    """The non-parameter entries of OpenAI's TorchScript archive."""
    import torch

    return {"input_resolution": torch.tensor(cfg.vision.image_size),
            "context_length": torch.tensor(cfg.text.context_length),
            "vocab_size": torch.tensor(cfg.text.vocab_size)}


@pytest.fixture(scope="module", params=["tiny", "tiny-gelu"])
def ref(request):
    """(cfg, transformers model, its state dict, reference params, OpenAI-layout state dict)."""
    cfg = get_config(request.param)
    model, sd = _random_hf(cfg)
    return cfg, model, sd, from_hf_state_dict(sd, cfg), hf_to_openai(sd, cfg)


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    _, sd = _random_hf(cfg, seed=1)
    return cfg, from_hf_state_dict(sd, cfg), hf_to_openai(sd, cfg)


# ---------------------------------------------------------------- each source -> the reference
def test_openai_layout_is_openai_clip(tiny):
    """Our OpenAI-layout rewrite loads strictly into OpenAI CLIP's module hierarchy (the layout oracle)."""
    cfg, _, osd = tiny
    missing, unexpected = openai_module(cfg).load_state_dict(dict(osd, **openai_markers(cfg)), strict=True)
    assert not missing and not unexpected


def test_hf_directory(ref, tmp_path):
    cfg, model, _, params_ref, _ = ref
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    params, got = convert_clip(tmp_path / "hf")
    assert got == cfg  # preset recognised (name, heads) and act from config.json hidden_act
    assert_trees_equal(params, params_ref)


def test_hf_directory_pytorch_bin(tiny, tmp_path):
    import torch

    cfg, params_ref, _ = tiny
    _, sd = _random_hf(cfg, seed=1)
    d = tmp_path / "hf"
    d.mkdir()
    cfg.to_hf_config().to_json_file(d / "config.json")
    torch.save(sd, d / "pytorch_model.bin")
    params, got = convert_clip(d)
    assert got == cfg
    assert_trees_equal(params, params_ref)


def test_openai_torchscript_archive(ref, tmp_path):
    import torch

    cfg, _, _, params_ref, osd = ref
    module = openai_module(cfg)
    module.load_state_dict(dict(osd, **openai_markers(cfg)), strict=True)
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated but is what OpenAI's archives are
        warnings.simplefilter("ignore")
        archive = torch.jit.trace(module, torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size))
        torch.jit.save(archive, str(path))
    params, got = convert_clip(path, tmp_path / "out")
    assert got == get_config("tiny")  # OpenAI archive -> quick_gelu, whatever the random model used
    assert_trees_equal(params, params_ref)
    src = json.loads((tmp_path / "out" / "source.json").read_text())
    assert src["format"] == "openai" and src["act"] == "quick_gelu" and "TorchScript" in src["act_source"]
    assert src["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_openai_plain_state_dict(tiny, tmp_path):
    """`torch.save(jit_model.state_dict())`: still OpenAI (input_resolution etc. present) -> quick_gelu."""
    import torch

    cfg, params_ref, osd = tiny
    torch.save(dict(osd, **openai_markers(cfg)), tmp_path / "model.pt")
    params, got = convert_clip(tmp_path / "model.pt")
    assert got == cfg
    assert_trees_equal(params, params_ref)


def test_openai_half_precision(tiny, tmp_path):
    """OpenAI's archives hold float16 weights: widened exactly to float32."""
    import torch

    from fiseclip_jax.clip.convert import from_openai_state_dict

    cfg, _, osd = tiny
    half = {k: v.half() for k, v in osd.items()}
    torch.save(dict(half, **openai_markers(cfg)), tmp_path / "ViT-half.pt")
    params, got = convert_clip(tmp_path / "ViT-half.pt")
    assert got == cfg
    assert_trees_equal(params, from_openai_state_dict({k: v.float() for k, v in half.items()}, cfg))
    assert not np.array_equal(params["vision"]["proj"], np.asarray(osd["visual.proj"]))  # really rounded


@pytest.mark.parametrize("fmt", ["safetensors", "bin-wrapped", "pt"])
def test_openclip_state_dict(ref, tmp_path, fmt):
    import torch
    from safetensors.torch import save_file

    cfg, _, _, params_ref, osd = ref
    t = cfg.text.context_length
    sd = dict(osd, attn_mask=torch.full((t, t), float("-inf")).triu(1))
    if fmt == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file(sd, str(path))
    elif fmt == "bin-wrapped":  # OpenCLIP training checkpoint saved from DDP
        path = tmp_path / "epoch_32.bin"
        torch.save({"epoch": 32, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        path = tmp_path / "model.pt"
        torch.save(sd, path)
    params, got = convert_clip(path, act=cfg.act)
    assert got == cfg  # tiny / tiny-gelu chosen by the act among same-shape presets
    assert_trees_equal(params, params_ref)


def test_openclip_bfloat16_safetensors(tiny, tmp_path):
    """bfloat16 has no numpy dtype: read through jax, widened exactly to float32."""
    import torch
    from safetensors.torch import save_file

    from fiseclip_jax.clip.convert import from_openai_state_dict

    cfg, _, osd = tiny
    bf = {k: v.to(torch.bfloat16) for k, v in osd.items()}
    save_file(bf, str(tmp_path / "m.safetensors"))
    params, _ = convert_clip(tmp_path / "m.safetensors", act="quick_gelu")
    assert_trees_equal(params, from_openai_state_dict({k: v.float() for k, v in bf.items()}, cfg))


def test_checkpoint_written_by_convert_loads_bit_exact(tiny, tmp_path):
    from fiseclip_jax.clip.checkpoint import load_clip
    from safetensors.torch import save_file

    cfg, params_ref, osd = tiny
    save_file(osd, str(tmp_path / "ViT-tiny-quickgelu.safetensors"))
    convert_clip(tmp_path / "ViT-tiny-quickgelu.safetensors", tmp_path / "ckpt")
    params, got = load_clip(tmp_path / "ckpt")
    assert got == cfg
    assert_trees_equal(params, params_ref)
    src = json.loads((tmp_path / "ckpt" / "source.json").read_text())
    assert src["format"] == "openclip" and src["act"] == "quick_gelu" and "quickgelu" in src["act_source"]


def test_infer_config_non_preset():
    """Shapes that match no preset: heads = width // 64 (OpenAI rule); HF and OpenAI layouts agree."""
    cfg = CLIPConfig(name="x", embed_dim=48,
                     vision=VisionConfig(width=128, layers=3, heads=2, patch_size=4, image_size=16),
                     text=TextConfig(width=64, layers=2, heads=1, vocab_size=100, context_length=9))
    _, sd = _random_hf(cfg)
    osd = hf_to_openai(sd, cfg)
    for layout, d in (("openai", osd), ("hf", sd)):
        got = infer_config(d, layout, act="gelu")
        assert got.replace(name="x") == cfg.replace(act="gelu")
    assert infer_config(osd, "openai", act="gelu").name == "ViT-w128-L3-p4-16"


# ---------------------------------------------------------------- activation
def test_openai_act_override_warns(tiny, tmp_path, capsys):
    import torch

    cfg, params_ref, osd = tiny
    torch.save(dict(osd, input_resolution=torch.tensor(32)), tmp_path / "ViT.pt")
    with pytest.warns(ActivationOverrideWarning, match="declares 'quick_gelu'.*act='gelu'"):
        params, got = convert_clip(tmp_path / "ViT.pt", act="gelu")
    assert got == get_config("tiny-gelu")
    assert "OVERRIDE" in capsys.readouterr().err
    assert_trees_equal(params, params_ref)


def test_hf_act_override_warns(tmp_path):
    model, _ = _random_hf(get_config("tiny"))
    model.save_pretrained(tmp_path / "hf")
    with pytest.warns(ActivationOverrideWarning, match="hidden_act"):
        _, got = convert_clip(tmp_path / "hf", act="gelu")
    assert got.act == "gelu"


def test_openclip_without_act_raises(tiny, tmp_path):
    from safetensors.torch import save_file

    _, _, osd = tiny
    save_file(osd, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(ActivationError, match=r"--act quick_gelu\|gelu"):
        convert_clip(tmp_path / "open_clip_model.safetensors")


def test_openclip_hub_directory_act_from_config(tiny, tmp_path):
    from safetensors.torch import save_file

    cfg, params_ref, osd = tiny
    d = tmp_path / "oc"
    d.mkdir()
    save_file(osd, str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 24}}))
    params, got = convert_clip(d)
    assert got == get_config("tiny-gelu")  # no "quick_gelu": true -> OpenCLIP's default GELU
    assert_trees_equal(params, params_ref)


def test_resolve_act_rules(capsys):
    assert resolve_act("quick_gelu", "x.pt") == ("quick_gelu", "x.pt")
    assert resolve_act(None, "sd", act="gelu") == ("gelu", "argument")
    act, why = resolve_act(None, "sd", arch="ViT-B-16-plus-240")
    assert act == "gelu" and "ViT-B-16-plus-240" in why and "inferred" in capsys.readouterr().err
    assert resolve_act(None, "sd", shape_presets=("ViT-B-16-plus-240",))[0] == "gelu"
    assert resolve_act(None, "sd", filename="ViT-B-32-quickgelu.bin")[0] == "quick_gelu"
    with pytest.raises(ActivationError, match="conflicting"):
        resolve_act(None, "sd", arch="ViT-B-16-plus-240", filename="x-quickgelu.pt")
    with pytest.raises(ActivationError, match="--act"):
        resolve_act(None, "sd", arch="ViT-B/16")  # OpenAI-shaped OpenCLIP models come in both
    with pytest.raises(ActivationError, match="must be one of"):
        resolve_act(None, "sd", act="relu")


# ---------------------------------------------------------------- errors name the problem
def _save(sd, path):
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path


def test_unused_key(tiny, tmp_path):
    import torch

    _, _, osd = tiny
    p = _save(dict(osd, **{"visual.extra_head.weight": torch.zeros(3)}), tmp_path / "m.safetensors")
    with pytest.raises(ConversionError, match=r"m\.safetensors.*unused source keys.*visual\.extra_head\.weight"):
        convert_clip(p, act="gelu")


def test_missing_key(tiny, tmp_path):
    _, _, osd = tiny
    sd = dict(osd)
    del sd["visual.ln_post.bias"]
    with pytest.raises(ConversionError, match=r"missing parameters \['vision\.ln_post\.bias'\]"):
        convert_clip(_save(sd, tmp_path / "m.safetensors"), act="gelu")


def test_missing_block(tiny, tmp_path):
    _, _, osd = tiny
    sd = {k: v for k, v in osd.items() if not k.startswith("transformer.resblocks.0.mlp.c_fc")}
    msg = (r"missing parameters \['text\.transformer\.blocks_0\.mlp\.fc1\.bias', "
           r"'text\.transformer\.blocks_0\.mlp\.fc1\.kernel'\]")
    with pytest.raises(ConversionError, match=msg):
        convert_clip(_save(sd, tmp_path / "m.safetensors"), arch="tiny", act="gelu")


def test_shape_mismatch(tiny, tmp_path):
    import torch

    _, _, osd = tiny
    sd = dict(osd, **{"visual.ln_pre.weight": torch.ones(33)})
    msg = r"shape mismatch.*vision\.ln_pre\.scale: source \(33,\) vs expected \(32,\)"
    with pytest.raises(ConversionError, match=msg):
        convert_clip(_save(sd, tmp_path / "m.safetensors"), act="gelu")


def test_arch_mismatch(tiny, tmp_path):
    _, _, osd = tiny
    p = _save(osd, tmp_path / "m.safetensors")
    with pytest.raises(ConversionError, match=r"arch 'ViT-B/16' does not match.*tiny.*vision\.width: 32 vs 768"):
        convert_clip(p, arch="ViT-B/16", act="quick_gelu")


def test_arch_mismatch_hf(tmp_path):
    model, _ = _random_hf(get_config("tiny"))
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match=r"arch 'ViT-L/14' does not match config\.json"):
        convert_clip(tmp_path / "hf", arch="ViT-L/14")


def test_arch_matching_is_used(tiny, tmp_path):
    cfg, params_ref, osd = tiny
    params, got = convert_clip(_save(osd, tmp_path / "m.safetensors"), arch="tiny-gelu", act="gelu")
    assert got == get_config("tiny-gelu")


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        convert_clip(tmp_path / "nope.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ConversionError, match=r"w\.npz: unknown weights format"):
        convert_clip(tmp_path / "w.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="empty: a directory without"):
        convert_clip(tmp_path / "empty")


def test_unknown_layout(tmp_path):
    from safetensors.numpy import save_file

    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ConversionError, match=r"x\.safetensors: unknown key layout"):
        convert_clip(tmp_path / "x.safetensors", act="gelu")
