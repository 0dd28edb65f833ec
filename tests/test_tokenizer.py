"""CLIP BPE tokenizer against known ids and against transformers' CLIPTokenizer
built from the same vocabulary file (SPEC §1, "Text")."""

import html
import itertools

import numpy as np
import pytest

from fiseclip_jax.clip import tokenizer as tk

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
# Ids printed by OpenAI's `clip.tokenize` and by transformers' tokenizer of openai/clip-vit-base-patch32,
# as published in public notes and scripts (copied by hand, not computed by any code here).
KNOWN_IDS = {
    "a photo of a cat": CAT_IDS,
    "a painting of a cat": [49406, 320, 3086, 539, 320, 2368, 49407],
    "bozuman": [49406, 647, 4091, 786, 49407],
    "n kabrie": [49406, 333, 6554, 5322, 49407],
    "The quick brown fox jumps over the lazy dog.":
        [49406, 518, 3712, 2866, 3240, 18911, 962, 518, 10753, 1929, 269, 49407],
}


def test_reference_ids_single_string():
    ids = tk.tokenize("a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    np.testing.assert_array_equal(ids[0, :7], CAT_IDS)
    assert not ids[0, 7:].any()  # OpenAI pads with 0


def test_known_openai_ids():
    for text, ids in KNOWN_IDS.items():
        got = tk.tokenize(text)[0]
        np.testing.assert_array_equal(got[: len(ids)], ids, err_msg=text)
        assert not got[len(ids):].any(), text


def test_batch_rows_are_independent():
    ids = tk.tokenize(["a photo of a cat", "cat", ""])
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    np.testing.assert_array_equal(ids[0, :7], CAT_IDS)
    # "cat" at a word end is the same "cat</w>" token as inside the sentence.
    np.testing.assert_array_equal(ids[1, :3], [49406, 2368, 49407])
    np.testing.assert_array_equal(ids[2, :2], [49406, 49407])
    assert not ids[1, 3:].any() and not ids[2, 2:].any()
    # The text tower reads the end token at argmax(ids).
    np.testing.assert_array_equal(ids.argmax(-1), [6, 2, 1])


def test_encode_has_no_special_tokens():
    assert tk.get_tokenizer().encode("a photo of a cat") == CAT_IDS[1:-1]
    assert tk.get_tokenizer() is tk.get_tokenizer()


def test_truncation_keeps_end_token():
    ids = tk.tokenize("a photo of a damaged metal nut " * 40)
    assert ids.shape == (1, 77) and (ids != 0).all()
    assert ids[0, 0] == tk.SOT_ID and ids[0, -1] == tk.EOT_ID
    body = tk.get_tokenizer().encode("a photo of a damaged metal nut " * 40)
    np.testing.assert_array_equal(ids[0, 1:-1], body[:75])
    short = tk.tokenize("a photo of a cat", context_length=4)
    np.testing.assert_array_equal(short[0], [49406, 320, 1125, 49407])


def test_html_and_whitespace_cleanup():
    want = tk.tokenize("cat & dog's photo")
    for text in ["cat &amp; dog&#39;s photo", "  Cat\t&amp;amp;\n DOG's   photo  "]:
        np.testing.assert_array_equal(tk.tokenize(text), want)


# --- agreement with transformers -------------------------------------------


def _prompts() -> list[str]:
    states = ["{}", "flawless {}", "perfect {}", "damaged {}", "broken {}", "{} with defect",
              "{} without flaw", "{} with a scratch"]
    templates = ["a photo of a {}.", "a cropped photo of the {}.", "A close-up photo of a {}.",
                 "a photo of the {} for visual inspection.", "a bright photo of a {}!",
                 "This is the {}'s surface", "there is a {} in the scene"]
    classes = ["bottle", "metal_nut", "toothbrush", "pcb1", "pcb4", "macaroni2", "pipe_fryum",
               "screw", "zipper", "capsules", "hazelnut", "candle"]
    prompts = [t.format(s.format(c.replace("_", " "))) for t, s, c in
               itertools.product(templates, states, classes)]
    prompts = prompts[::2]  # a few hundred keeps the test fast
    prompts += [
        "A PHOTO OF A METAL NUT", "MiXeD CaSe Bottle", "pcb1, pcb2; pcb3: pcb4?", "12345 67.89",
        "it's a cat's toy, we're sure they've done it, I'm sure you'll see, he'd go",
        "café crème brûlée", "naïve Zürich façade", "日本語のテキスト", "emoji 🙂 test",
        "cafe\u0301 decomposed accent", "  extra   whitespace\tand\nnewlines  ", "",
        "a--b__c..d!!e??f", "(brackets) [square] {curly} <angle>", "x1y2z3 3d 4k",
        "<|startoftext|> special <|endoftext|>", "snake_case_name and kebab-case-name",
        "fish &amp; chips", "&lt;tag&gt; &quot;quoted&quot;", "double &amp;amp; escaped",
        "a very long prompt " * 30,
    ]
    return prompts


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer on vocab.json/merges.txt written once from OpenAI's BPE file by
    tests/fixtures/make_clip_tokenizer_files.py (which imports nothing from fiseclip_jax)."""
    pytest.importorskip("transformers")
    from clip_reference import hf_clip_tokenizer

    ref = hf_clip_tokenizer(tmp_path_factory.mktemp("clip_vocab"))
    # Guard against a vacuous reference (e.g. an empty vocabulary).
    assert len(ref) == 49408
    for text, ids in KNOWN_IDS.items():
        assert ref(text)["input_ids"] == ids, text
    return ref


def test_agrees_with_transformers(hf_tokenizer):
    prompts = _prompts()
    assert len(prompts) > 250
    # transformers' normaliser is NFC + whitespace + lowercase, without OpenAI's
    # html.unescape; give it the unescaped text so only that documented step differs.
    ref_inputs = [html.unescape(html.unescape(p)) for p in prompts]
    want = hf_tokenizer(ref_inputs, truncation=True, max_length=77)["input_ids"]
    got = tk.tokenize(prompts)
    for prompt, w, g in zip(prompts, want, got):
        assert g[: len(w)].tolist() == w, prompt
        assert not g[len(w):].any(), prompt


def test_trim_context_keeps_the_smallest_bucket_holding_every_end_token():
    ids = np.zeros((3, 77), np.int32)
    for row, length in enumerate((5, 16, 9)):  # start, length - 2 word ids, end
        ids[row, :length] = [tk.SOT_ID, *range(1000, 1000 + length - 2), tk.EOT_ID]
    cut = tk.trim_context(ids)
    assert cut.shape == (3, 16)  # longest is 16 tokens: bucket 16, no padding beyond it
    np.testing.assert_array_equal(cut, ids[:, :16])
    ids[2, 16] = tk.EOT_ID  # one row now needs 17 tokens -> next bucket, 24
    ids[2, 8] = 500
    assert tk.trim_context(ids).shape == (3, 24)
    assert tk.trim_context(ids, buckets=(10, 20)).shape == (3, 20)
    assert tk.trim_context(ids, buckets=(8,)).shape == (3, 77)  # no bucket fits: full context
    assert tk.trim_context(ids[:, :20], buckets=(32,)).shape == (3, 20)  # never wider than the input
    long = tk.tokenize("word " * 100)  # truncated: the end token sits at position 76
    assert tk.trim_context(long).shape == (1, 77)
