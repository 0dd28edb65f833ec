"""Prompt sets and text features (SPEC §3)."""

import numpy as np
import pytest

from fiseclip_jax import prompts, text_features, tokenize
from fiseclip_jax.clip.tokenizer import CONTEXT_BUCKETS
from fiseclip_jax.clip.modeling import encode_text
from fiseclip_jax.prompts import (ANOCLIP_OBJECT, ANOCLIP_TEXTURE, WINCLIP, PromptSet, _CACHE, clean_class_name,
                                  get_prompt_set, text_features_full)


def test_prompt_counts_and_texts():
    n, a = WINCLIP.sentences("bottle")
    assert (len(n), len(a)) == (7 * 22, 5 * 22)
    assert "a photo of a flawless bottle for visual inspection." in n
    assert "a close-up photo of the bottle with damage." in a
    n, a = ANOCLIP_OBJECT.sentences("metal nut")
    assert len(n) == len(a) == 462  # 66 templates x 7 states
    assert "an industrial photo of a metal nut without defect" in n
    assert "a manufacturing image of the imperfect metal nut for anomaly detection" in a
    assert "a cropped industrial photo of the normal metal nut" in n
    # template-major, AnoVL's order: the 7 states of the first template, then the next template
    assert n[:2] == ["a cropped industrial photo of the normal metal nut",
                     "a cropped industrial photo of the flawless metal nut"]
    assert a[7] == "a cropped industrial photo of a damaged metal nut"
    assert get_prompt_set("anoclip", "wood") is ANOCLIP_TEXTURE
    assert get_prompt_set("anoclip", "metal_nut") is ANOCLIP_OBJECT
    assert any("textural photo" in t for t in ANOCLIP_TEXTURE.templates)
    assert clean_class_name("metal_nut") == "metal nut"


# AnoVL's prompt_ensemble.py (hq-deng/AnoVL): per domain phrase, six adjectives each with its two articles in
# the authors' order, then ten plain patterns; objects: inds_temp + img_temp + mnf_temp, textures (carpet,
# leather, grid, tile, wood): inds_temp + text_temp + surf_temp (the second surf_temp, "surface picture").
ANOVL_ADJECTIVES = (("cropped", "the", "a"), ("close-up", "a", "the"), ("bright", "a", "the"),
                    ("dark", "the", "a"), ("jpeg corrupted", "a", "the"), ("blurry", "the", "a"))
ANOVL_TAILS = ("of a {}", "of the {}", "of a small {}", "of the small {}", "of a large {}", "of the large {}",
               "of the {} for visual inspection", "of a {} for visual inspection",
               "of the {} for anomaly detection", "of a {} for anomaly detection")


def anovl_templates(domains):
    """domains: (phrase, the phrase with its article) -> the 22 templates of each, in AnoVL's order."""
    out = []
    for phrase, with_article in domains:
        out += [f"a {adj} {phrase} of {art} {{}}" for adj, *arts in ANOVL_ADJECTIVES for art in arts]
        out += [f"{with_article} {tail}" for tail in ANOVL_TAILS]
    return out


def test_anoclip_templates_are_anovls_in_its_order():
    """Every AnoCLIP template word for word, in the authors' order (the text adapter's row k pairs with
    their sentence k, methods/tta.py)."""
    assert list(ANOCLIP_OBJECT.templates) == anovl_templates(
        [("industrial photo", "an industrial photo"), ("industrial image", "an industrial image"),
         ("manufacturing image", "a manufacturing image")])
    assert list(ANOCLIP_TEXTURE.templates) == anovl_templates(
        [("industrial photo", "an industrial photo"), ("textural photo", "a textural photo"),
         ("surface picture", "a surface picture")])
    assert "a dark industrial photo of the {}" in ANOCLIP_OBJECT.templates


def test_text_features_is_normalised_mean_of_unnormalised_embeddings(tmp_path):
    """Reference: transformers' tokenizer (OpenAI's vocabulary, committed fixture) and PyTorch CLIP text
    tower on the same random weights; nothing of ours but the weight conversion."""
    torch = pytest.importorskip("torch")
    from clip_reference import hf_clip_tokenizer, hf_model_and_params

    model, params, cfg = hf_model_and_params("tiny")
    pset = PromptSet("mine", ("{}", "good {}"), ("bad {}",), ("a photo of a {}.", "the {}."))
    feats = np.asarray(text_features(params, cfg, "bottle", pset))
    normal = ["a photo of a bottle.", "a photo of a good bottle.", "the bottle.", "the good bottle."]
    abnormal = ["a photo of a bad bottle.", "the bad bottle."]
    hf_tok = hf_clip_tokenizer(tmp_path)
    want = []
    for side in (normal, abnormal):
        ids = torch.tensor(hf_tok(side, padding=True)["input_ids"])
        with torch.no_grad():
            e = model.text_projection(model.text_model(input_ids=ids).pooler_output).numpy().mean(0)
        want.append(e / np.linalg.norm(e))
    np.testing.assert_allclose(feats, np.stack(want), atol=1e-5, rtol=0)
    assert np.abs(want[0] - want[1]).max() > 1e-2  # the two sides differ: a swap would show
    # the per-sentence features (AnoCLIP+'s text adapter): each sentence's embedding, unit norm
    full = text_features_full(params, cfg, "bottle", pset)
    for side, got in ((normal, full.normal_sentences), (abnormal, full.abnormal_sentences)):
        ids = torch.tensor(hf_tok(side, padding=True)["input_ids"])
        with torch.no_grad():
            e = model.text_projection(model.text_model(input_ids=ids).pooler_output).numpy()
        np.testing.assert_allclose(np.asarray(got), e / np.linalg.norm(e, axis=-1, keepdims=True), atol=1e-5, rtol=0)
    # cached per (weights, class, prompt set)
    n_cached = len(_CACHE)
    text_features_full(params, cfg, "bottle", pset)
    assert len(_CACHE) == n_cached
    text_features_full(params, cfg, "cable", pset)
    assert len(_CACHE) == n_cached + 1


@pytest.mark.parametrize("preset,class_name,stride", [("tiny", "metal nut", 1), ("ViT-B/16", "bottle", 5)])
def test_bucketed_sentences_match_pytorch_at_full_context(preset, class_name, stride, monkeypatch):
    """The text tower runs on the shortest bucketed context (SPEC §1, causal mask); its embeddings
    equal transformers' CLIP run on all 77 positions."""
    torch = pytest.importorskip("torch")
    from clip_reference import hf_model_and_params

    model, params, cfg = hf_model_and_params(preset)
    normal, abnormal = WINCLIP.sentences(class_name)
    sentences = (normal + abnormal)[::stride]
    ids = tokenize(sentences)  # [N, 77]
    longest = int(ids.argmax(-1).max()) + 1
    shapes = []
    monkeypatch.setattr(prompts, "encode_text", lambda p, c, x: shapes.append(x.shape) or encode_text(p, c, x))
    got = prompts._embed_sentences(params, cfg, sentences)
    with torch.no_grad():
        ref = model.text_projection(model.text_model(input_ids=torch.from_numpy(ids).long()).pooler_output).numpy()
    assert np.abs(got - ref).max() <= 1e-5
    # one shape for every call; width: the first bucket holding the longest sentence; row padding < 8 per call
    assert len(set(shapes)) == 1
    rows, width = shapes[0]
    assert width == min(b for b in CONTEXT_BUCKETS if b >= longest) < 77
    assert 0 <= rows * len(shapes) - len(sentences) < 8 * len(shapes)
