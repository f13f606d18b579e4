"""Modifier-token rules: the default initialisers."""

from __future__ import annotations

import pytest
from helpers import write_concept_folder

from cdtool.errors import UsageError
from cdtool.models.clip_vocab import load_clip_tokenizer
from cdtool.models.tokens import DEFAULT_INIT, default_init_tokens, resolve_init_token


def test_new_k_starts_from_the_kth_initialiser_whatever_the_run():
    # the reference's three for a joint run of <new1>..<new3>
    assert default_init_tokens(["<new1>", "<new2>", "<new3>"]) == ["ktn", "pll", "ucd</w>"]
    # ... and the same ones for each trained alone: separately trained concepts start apart
    assert default_init_tokens(["<new2>"]) == ["pll"]
    assert default_init_tokens(["<new16>"]) == ["afs</w>"]
    with pytest.raises(UsageError, match=r"<new17>: there are default initialisers for <new1> to <new16>"):
        default_init_tokens(["<new17>"])


def test_other_tokens_hash_to_an_entry_and_stay_apart_within_a_run():
    one = default_init_tokens(["<cat>"])
    assert one == default_init_tokens(["<cat>"]) and one[0] in DEFAULT_INIT
    names = [f"<thing{i}>" for i in range(len(DEFAULT_INIT))]
    picks = default_init_tokens(names)
    assert len(set(picks)) == len(DEFAULT_INIT)  # collisions pass to the next free entry
    with pytest.raises(UsageError, match="more than 16 concepts in one run"):
        default_init_tokens([*names, "<one-more>"])


def test_every_default_initialiser_is_one_distinct_vocabulary_entry():
    tok = load_clip_tokenizer()
    vocab = tok.get_vocab()
    assert all(t in vocab for t in DEFAULT_INIT)
    ids = [resolve_init_token(tok, t) for t in DEFAULT_INIT]
    assert ids[:3] == [42170, 47629, 43514]  # the ids the official code hard-codes
    assert len(set(ids)) == len(ids) and all(i > 40000 for i in ids)


def test_separately_trained_concepts_record_distinct_initialisers(cli, tmp_path):
    from cdtool.delta.file import read_cdtool

    inits = []
    for i, token in enumerate(["<new1>", "<new2>"]):
        data = write_concept_folder(tmp_path / f"c{i}", 2)
        out = tmp_path / f"c{i}.safetensors"
        cli("train", data, "--class-noun", "cat", "--token", token, "-o", out, "--model", "tiny",
            "--steps", 1, "--resolution", 64)  # fmt: skip
        inits.append(read_cdtool(out).concepts[0]["init_token"])
    assert inits == ["ktn", "pll"]


def test_a_compact_vocabulary_tokenizes_its_words_as_clip_does(tmp_path):
    """The toy text encoder's vocabulary: a cut of CLIP's that splits every word of the toy world as
    CLIP's full vocabulary does, holds the default initialisers, and still tokenizes any text."""
    import random

    from transformers import CLIPTokenizer

    from cdtool.models.clip_vocab import compact_vocab_and_merges, write_tokenizer
    from cdtool.models.tokens import DEFAULT_INIT
    from cdtool.toy.photos import toy_captions
    from cdtool.toy.world import caption_words

    write_tokenizer(tmp_path, *compact_vocab_and_merges(caption_words(), DEFAULT_INIT))
    small, full = CLIPTokenizer.from_pretrained(str(tmp_path)), load_clip_tokenizer()
    assert 512 < len(small) < 1000 and small.pad_token_id == small.eos_token_id
    for caption in [*toy_captions(random.Random(0), None, 200), "a far away a small red and white dotted heart"]:
        assert small.tokenize(caption) == full.tokenize(caption), caption
    assert all(piece in small.get_vocab() for piece in DEFAULT_INIT)
    pieces = small.tokenize("zebra crossing")  # words it never saw: smaller pieces, nothing lost
    assert "".join(pieces).replace("</w>", " ").split() == ["zebra", "crossing"] and "<|endoftext|>" not in pieces
