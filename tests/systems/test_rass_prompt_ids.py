"""On-device prompt ids (prompt mode "ram"): `assemble_ids` of a tag mask against the CLIP tokenizer run on
the cleaned prompt string RASS builds (clean_caption(f"{tags joined by ', '}, {suffix}")), for random tag
subsets: multi-word tags, apostrophes, capitals, digits, punctuation, tags that clean to nothing, long
prompts truncated at 77, with and without a suffix, under a BPE vocabulary with merges and the byte-level
one (one id per character, so truncation is frequent)."""

import json

import jax
import numpy as np
import pytest

from lqseg_jax.models.clip_text import load_tokenizer, tokenize
from lqseg_jax.systems.prompts import assemble_ids, clean_caption, prompt_tokens, write_byte_level_tokenizer

WORDS = ["sky", "tree", "road", "cube", "rubik", "person", "car", "wall", "building", "dog", "night"]
TAGS = [
    "sky", "tree", "road", "rubik's cube", "person", "Car", "wall", "building", "dog", "night sky",
    "t-shirt", "rock & roll", "4x4", "'", "a,b", "city street at night", "doughnut's", "pavilion",
    "traffic light", "x" * 40, "ice-cream cone", "tree's bark", "7", "blue sky", "snowy mountain range",
]  # fmt: skip


def bpe_tokenizer(folder):
    """The byte-level tokenizer plus BPE merges that build each of WORDS into one id (ranked in order)."""
    write_byte_level_tokenizer(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return load_tokenizer(folder)


@pytest.mark.parametrize("vocab", ["bpe", "bytes"])
def test_assembled_ids_are_the_tokenizers(tmp_path, vocab):
    tok = bpe_tokenizer(tmp_path) if vocab == "bpe" else load_tokenizer(write_byte_level_tokenizer(tmp_path))
    if vocab == "bpe":
        words = tok(["night sky"], add_special_tokens=False).input_ids[0]
        assert words == tok.convert_tokens_to_ids(["night</w>", "sky</w>"])  # the merges apply
    rng = np.random.default_rng(0)
    masks = rng.random((160, len(TAGS))) < rng.choice([0.05, 0.2, 0.5, 0.9], size=(160, 1))  # (n, K)
    masks[0] = False  # no tag: the empty prompt (or the suffix alone)
    masks[1] = True
    for suffix in ("", "High quality, 4K"):
        tokens = prompt_tokens(tok, TAGS, suffix)
        ids = np.asarray(jax.jit(lambda m, t=tokens: assemble_ids(m, t))(masks))  # (n, 77)
        prompts = [
            clean_caption(f"{', '.join(t for t, on in zip(TAGS, row, strict=True) if on)}, {suffix}")
            for row in masks
        ]
        expected = tokenize(tok, prompts, tok.model_max_length)  # (n, 77)
        np.testing.assert_array_equal(ids, expected)
        full = (expected[:, -1] != tok.pad_token_id).sum()
        assert full > 10  # truncated prompts are among those checked
    assert expected[0, 0] == tok.bos_token_id and expected[0, -1] == tok.pad_token_id


def test_bracketed_tags_are_refused(tmp_path):
    tok = load_tokenizer(write_byte_level_tokenizer(tmp_path))
    with pytest.raises(ValueError, match=r"tag 1 '\[sky' starts or ends with a bracket"):
        prompt_tokens(tok, ["tree", "[sky"])
    with pytest.raises(ValueError, match="a mask over 3 tags for a tag list of 2"):
        assemble_ids(np.zeros((1, 3), bool), prompt_tokens(tok, ["a", "b"]))
