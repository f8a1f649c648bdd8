"""Image-caption pairs for the vision alignment stage (LLaVA stage-1 style), drawn from their own seed stream.

The captions describe what the renderer draws (shapes, colours, positions, sizes, rendered words, digits, covers,
photo quality) in plain sentences; they are not the CoIN-mini tasks' questions or answers, and the digits come only
from the pool the ImageNet task's test split never uses.
"""
from __future__ import annotations

import random
import re

from pclr.demo.data import scenes
from pclr.demo.data.coin_mini import BOOK_TITLES, DIGIT_TEST_EVERY, GENRES, NUMBER_WORDS, SIGN_WORDS
from pclr.demo.data.scenes import COLOURS, SHAPES

EXTRA_WORDS = ("milk", "road", "gate", "lamp", "door", "fish", "wind", "blue", "tree", "mall", "zoo", "info")
EXTRA_TITLES = ("Snow", "Old Road", "Green Sea", "Night", "Sun Cup")
PROMPT = "<image>\nDescribe the image briefly."


def _where(obj: scenes.Obj, size: int) -> str:
    cx, cy = obj.center
    col = 0 if cx < size / 3 else (1 if cx < 2 * size / 3 else 2)
    row = 0 if cy < size / 3 else (1 if cy < 2 * size / 3 else 2)
    return scenes.POSITIONS_3x3[row * 3 + col]


def caption_sample(rng: random.Random, size: int, i: int) -> dict:
    """One CoIN-format sample with an in-memory PIL image and its caption."""
    kind = rng.choices(["shapes", "sign", "digit", "book", "bad"], weights=[5, 2, 2, 2, 1])[0]
    if kind == "shapes":
        n = rng.randint(1, 3)  # short captions: every caption token costs a full 30-layer backward
        specs = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(n)]
        objs = scenes.place_objects(rng, size, specs, sizes=(9, 12, 16, 20, 25))
        img = scenes.scene(rng, size, objs)
        parts = []
        for o in sorted(objs, key=lambda o: -o.area):
            s = o.box[2] - o.box[0]
            adj = "small" if s < size * 0.2 else ("large" if s > size * 0.33 else "medium")
            parts.append(f"a {adj} {o.colour} {o.shape} at the {_where(o, size)}")
        text = f"{len(objs)} object{'s' if n > 1 else ''}: " + ", ".join(parts) + "."
    elif kind == "sign":
        word = rng.choice(SIGN_WORDS + EXTRA_WORDS)
        img = scenes.text_image(rng, size, word.upper() if rng.random() < 0.5 else word)
        text = f"a sign with the word {word}."
    elif kind == "digit":
        images, labels = scenes.digits()
        pool = [k for k in range(len(labels)) if k % DIGIT_TEST_EVERY != 0]
        k = pool[rng.randrange(len(pool))]
        img = scenes.digit_image(rng, size, images[k])
        text = f"a handwritten digit {NUMBER_WORDS[int(labels[k])]}."
    elif kind == "book":
        title = rng.choice(BOOK_TITLES + EXTRA_TITLES)
        genre = rng.choice(list(GENRES))
        img = scenes.book_cover(rng, size, title, GENRES[genre])
        text = f"a {genre} book cover with the title {title}."
    else:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        objs = scenes.place_objects(rng, size, [(shape, colour)], sizes=(26, 32))
        img = scenes.obscure(rng, scenes.scene(rng, size, objs))
        text = "a dark or blurry photo where nothing can be made out."
    return {"id": f"align-{i}", "image": img,
            "conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": text}]}


def caption_samples(n: int, seed: int, size: int) -> list[dict]:
    rng = random.Random(f"pclr-align-{seed}")
    return [caption_sample(rng, size, i) for i in range(n)]


# ------------------------------------------------------------------------------------ token-level captions
def _size_word(obj: scenes.Obj, size: int) -> str:
    s = obj.box[2] - obj.box[0]
    return "small" if s < size * 0.2 else ("large" if s > size * 0.33 else "medium")


def word_caption(rng: random.Random, size: int) -> tuple:
    """(image, caption) with a terse caption of at most ~16 SmolLM2 tokens, one visual fact per word.

    These are the targets of the embedding-space alignment (``pclr.demo.models.alignment``): each of the 16 image tokens
    is pulled onto the input embedding of one caption token, so the frozen LM reads an image like a short text.
    Objects are listed left to right (sizes and positions in words for one or two objects, sizes for three, colour
    and shape only for crowded scenes, so that counting scenes of up to six objects still fit).
    """
    kind = rng.choices(["shapes", "crowd", "sign", "digit", "book", "bad"], weights=[6, 2, 2, 2, 2, 1])[0]
    if kind in ("shapes", "crowd"):
        n = rng.randint(1, 3) if kind == "shapes" or size < 48 else rng.randint(4, 6)  # tiny canvases: no crowds
        specs = [(rng.choice(SHAPES), rng.choice(list(COLOURS))) for _ in range(n)]
        sizes = (9, 12, 16, 20, 25, 32, 38) if n <= 3 else (9, 11, 13)
        objs = scenes.place_objects(rng, size, specs, sizes=sizes)
        img = scenes.scene(rng, size, objs)
        objs = sorted(objs, key=lambda o: o.center[0])
        if n <= 2:
            text = ", ".join(f"{_size_word(o, size)} {o.colour} {o.shape} {_where(o, size)}" for o in objs)
        elif n == 3:  # left-to-right order stands in for the positions (16 tokens at most)
            text = ", ".join(f"{_size_word(o, size)} {o.colour} {o.shape}" for o in objs)
        else:
            text = ", ".join(f"{o.colour} {o.shape}" for o in objs)
        if rng.random() < 0.15:  # VizWiz-style failures of a plain scene
            return scenes.obscure(rng, img), "dark blurry photo"
        return img, text
    if kind == "sign":
        word = rng.choice(SIGN_WORDS + EXTRA_WORDS)
        return scenes.text_image(rng, size, word.upper() if rng.random() < 0.5 else word), f"sign: {word}"
    if kind == "digit":
        images, labels = scenes.digits()
        pool = [k for k in range(len(labels)) if k % DIGIT_TEST_EVERY != 0]  # never the ImageNet test digits
        k = pool[rng.randrange(len(pool))]
        return scenes.digit_image(rng, size, images[k]), f"digit {NUMBER_WORDS[int(labels[k])]}"
    if kind == "book":
        title = rng.choice(BOOK_TITLES + EXTRA_TITLES)
        genre = rng.choice(list(GENRES))
        cover = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in GENRES[genre])
        return scenes.book_cover(rng, size, title, cover), f"{genre} book: {title}"
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    objs = scenes.place_objects(rng, size, [(shape, colour)], sizes=(26, 32, 38))
    return scenes.obscure(rng, scenes.scene(rng, size, objs)), "dark blurry photo"


def word_captions(n: int, seed: int, size: int) -> list[tuple]:
    """``n`` (image, terse caption) pairs from the alignment's own seed stream."""
    rng = random.Random(f"pclr-align-words-{seed}")
    return [word_caption(rng, size) for _ in range(n)]


CONTENT_CLASSES = ("sign", "digit", "colour", "shape")
CAPTION_KINDS = ("scene", "sign", "digit", "book", "photo")


def caption_kind(text: str) -> str:
    """Which of ``CAPTION_KINDS`` a terse caption written by :func:`word_caption` describes."""
    if text.startswith("sign: "):
        return "sign"
    if text.startswith("digit "):
        return "digit"
    if "book:" in text:
        return "book"
    return "photo" if text == "dark blurry photo" else "scene"


def content_words(text: str) -> list[tuple[str, str, int]]:
    """(class, word, character offset) of each content word of a terse caption written by :func:`word_caption`.

    Classes (``CONTENT_CLASSES``): the sign's word, the digit's number word, and the colour and shape words of a
    scene. Book captions and photo-quality captions have none.
    """
    kind = caption_kind(text)
    if kind in ("sign", "digit"):
        return [(kind, text[6:], 6)]
    if kind != "scene":
        return []
    out = []
    for m in re.finditer(r"[a-z]+", text):
        if m.group() in COLOURS:
            out.append(("colour", m.group(), m.start()))
        elif m.group() in SHAPES:
            out.append(("shape", m.group(), m.start()))
    return out
