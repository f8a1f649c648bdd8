"""The held-out content-word readout of aligned image tokens and the caption parsing it relies on."""
import pytest
import torch

from pclr.demo.data.captions import content_words, word_captions
from pclr.demo.models.alignment import caption_targets
from pclr.demo.models.readout import content_word_readout
from pclr.models.tiny import tiny_tokenizer


def test_content_words_of_each_caption_kind():
    assert content_words("sign: blue") == [("sign", "blue", 6)]  # a sign word that is also a colour stays a sign
    assert content_words("digit seven") == [("digit", "seven", 6)]
    assert content_words("small red circle left, large blue square top") == [
        ("colour", "red", 6), ("shape", "circle", 10), ("colour", "blue", 29), ("shape", "square", 34)]
    assert content_words("nature book: Moon") == [] and content_words("dark blurry photo") == []
    for _, text in word_captions(40, 3, 64):  # every generated caption parses; offsets point at the word
        for _, word, start in content_words(text):
            assert text[start:start + len(word)] == word


def _setup():
    tok = tiny_tokenizer(["sign", "stop", "exit", "digit", "seven", "red", "circle", "left"])
    table = torch.eye(len(tok))  # one orthogonal embedding per token: the nearest word is unambiguous
    captions = ["sign: stop", "digit seven", "red circle left"]
    targets = caption_targets(tok, captions, 6, repeat=False)
    return tok, table, captions, targets


def test_readout_own_and_any_token():
    tok, table, captions, targets = _setup()
    exact = table[targets]  # [3, 6, V]: every image token is its target word's embedding
    r = content_word_readout(exact, captions, tok, table)
    assert {c: (v["n"], v["own_token"], v["any_token"]) for c, v in r.items()} == {
        "sign": (1, 1.0, 1.0), "digit": (1, 1.0, 1.0), "colour": (1, 1.0, 1.0), "shape": (1, 1.0, 1.0)}
    moved = exact.flip(1)  # the right words at the wrong grid positions: read anywhere, never at their own cell
    r = content_word_readout(moved, captions, tok, table)
    assert all(v["own_token"] == 0.0 and v["any_token"] == 1.0 for v in r.values())
    vocab = torch.tensor([tok.convert_tokens_to_ids("exit")])  # only a wrong word to choose from
    r = content_word_readout(exact, captions, tok, table, vocab)
    assert r["sign"]["any_token"] == 0.0 and r["digit"]["own_token"] == 0.0
    with pytest.raises(ValueError, match="image_tokens"):
        content_word_readout(exact[:2], captions, tok, table)


def test_caption_targets_repeat_fills_the_grid():
    tok, _, captions, filled = _setup()
    rep = caption_targets(tok, captions, 6, repeat=True)
    ids = tok("sign: stop", add_special_tokens=False)["input_ids"]
    assert rep[0].tolist() == ids + ids
    assert filled[0].tolist()[:3] == ids and len(set(filled[0].tolist()[3:])) == 1  # the filler
