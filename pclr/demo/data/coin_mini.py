"""CoIN-mini: eight synthetic tasks shaped like CoIN's, generated on the user's machine (no download).

    from pclr.demo.data.coin_mini import generate, TASKS
    info = generate("~/.cache/pclr/coin-mini", seed=0, n_train=256, n_test=300)   # n_train scaled per task
    info.tasks["TextVQA"].train_json      # <root>/TextVQA/train.json (CoIN / LLaVA conversation format)

Layout (as CoIN's): ``<root>/<Task>/{train,test}.json`` and ``<root>/<Task>/images/<split>_<i>.png``; image paths in the
JSON are relative to ``<root>/<Task>`` (the task's ``image_root``). ``<root>/manifest.json`` records version, seed and
sizes; a directory holding the same manifest is reused as is (generation takes a few seconds otherwise).

Each task has its own answer format and vocabulary so that sequential fine-tuning on later tasks overwrites earlier
behaviour (the forgetting the benchmark is meant to expose), while each remains a small mapping that a LoRA on the
mini LLaVA learns in the default preset's steps (each task's single-task LoRA accuracy, next to its chance and blind
levels, is in the report of every ``pclr run``):

=========  =========================================================  ===========================  =========
task       image / question                                           answer                       scorer
=========  =========================================================  ===========================  =========
ScienceQA  a diagram of one shape; which shape is shown (options: the   option letter "A".."D"       choice
           four shapes, fixed order)
TextVQA    a word on a sign; what is written                          the word (12-word vocab)     exact
ImageNet   a handwritten digit (sklearn digits); what is it            "zero".."nine"               exact
GQA        two shapes of one colour; the colour of a named shape, or  colour or shape              exact
           the shape next to the named one
VizWiz     one object, sometimes dark or blurred; what shape           shape or "unanswerable"      exact
Grounding  one shape centred in a cell of a 3x3 grid; the cell         "top left" .. "bottom right" exact
           (region) of the named shape: a box quantised to the grid
VQAv2      1-3 shapes, how many; one shape, its colour                "1".."3", colour             exact
OCR-VQA    a book cover; title / genre                                title (10) or genre (5)      exact
=========  =========================================================  ===========================  =========

Every answer needs the image: :func:`task_baselines` gives each task's chance level (uniform guessing among the
answers its question template admits) and a blind baseline (each question template's most frequent training answer,
the best a model that ignores the image can learn from the training set).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from PIL import Image

from pclr.cil.metrics import get_scorer
from pclr.demo.data import scenes
from pclr.demo.data.scenes import COLOURS, SHAPES, POSITIONS_3x3

VERSION = 3
TASK_ORDER: tuple[str, ...] = ("ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCR-VQA")
SHORT = "\nAnswer the question using a single word or phrase."
SIGN_WORDS = ("stop", "exit", "open", "taxi", "cafe", "bank", "park", "shop", "hotel", "sale", "push", "bus")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BOOK_TITLES = ("Moon", "Red Fox", "Ocean", "Big Cat", "Winter", "Gold", "Rain Day", "Tiger", "Home", "Star Map")
GENRES = {"romance": (200, 60, 90), "travel": (40, 110, 200), "nature": (50, 140, 60), "history": (130, 90, 50),
          "science": (90, 90, 100)}
# Training-set size of each task relative to ``n_train`` (CoIN's tasks differ in size too): the multiple-choice and
# the two-object tasks take the most steps to learn, the single-object ones the fewest. Test sets are all ``n_test``.
TRAIN_SCALE = {"ScienceQA": 2.0, "TextVQA": 1.0, "ImageNet": 0.75, "GQA": 2.0, "VizWiz": 0.5, "Grounding": 1.0,
               "VQAv2": 1.0, "OCR-VQA": 0.75}
# Digits reserved for the ImageNet-task test split; everything else may be used for training or vision alignment.
DIGIT_TEST_EVERY = 4

Sample = tuple[Optional[Image.Image], str, str]  # (image, question, answer)


@dataclass
class TaskSpec:
    """One CoIN-mini task: its generator and scorer type ("exact" | "choice" | "grounding")."""

    name: str
    scorer: str
    make: Callable[[random.Random, int, str, int], Sample]  # (rng, image_size, split, index) -> sample
    description: str = ""


@dataclass
class TaskFiles:
    name: str
    scorer: str
    root: Path  # the task's image_root
    train_json: Path
    test_json: Path
    n_train: int
    n_test: int


@dataclass
class CoinMini:
    root: Path
    seed: int
    image_size: int
    tasks: dict[str, TaskFiles] = field(default_factory=dict)
    generated: bool = False  # False when a cached directory was reused


# --------------------------------------------------------------------------------------------------- task makers
def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _distinct_specs(rng: random.Random, n: int, *, distinct_shapes: bool = True) -> list[tuple[str, str]]:
    colours = rng.sample(list(COLOURS), n)
    shapes = rng.sample(list(SHAPES), n) if distinct_shapes else [rng.choice(SHAPES) for _ in range(n)]
    return list(zip(shapes, colours))


def make_scienceqa(rng: random.Random, size: int, split: str, i: int) -> Sample:
    # multiple choice over a diagram of one shape; fixed option order, so the letter is a function of what is drawn,
    # not of how the options were shuffled
    (shape, colour), = _distinct_specs(rng, 1)
    objs = scenes.place_objects(rng, size, [(shape, colour)], sizes=(36, 44))
    letters = _letters(len(SHAPES))
    opts = "\n".join(f"{c}. {s}" for c, s in zip(letters, SHAPES))
    q = (f"Which shape is shown in the diagram?\n{opts}\n"
         "Answer with the option's letter from the given choices directly.")
    return scenes.scene(rng, size, objs), q, letters[SHAPES.index(shape)]


def make_textvqa(rng: random.Random, size: int, split: str, i: int) -> Sample:
    word = rng.choice(SIGN_WORDS)
    q = rng.choice(["What word is written on the sign?", "What does the sign say?", "What is written in the image?"])
    return scenes.text_image(rng, size, word.upper() if rng.random() < 0.5 else word), q + SHORT, word


def make_imagenet(rng: random.Random, size: int, split: str, i: int) -> Sample:
    images, labels = scenes.digits()
    pool = [k for k in range(len(labels)) if (k % DIGIT_TEST_EVERY == 0) == (split == "test")]
    k = pool[rng.randrange(len(pool))]
    q = "What is the object in the image?" + SHORT
    return scenes.digit_image(rng, size, images[k]), q, NUMBER_WORDS[int(labels[k])]


def make_gqa(rng: random.Random, size: int, split: str, i: int) -> Sample:
    # two shapes of one colour: the colour of a named shape, or the shape next to a named one (the other one)
    (s1, colour), (s2, _) = _distinct_specs(rng, 2)
    objs = scenes.place_objects(rng, size, [(s1, colour), (s2, colour)], sizes=(18, 26), distinct_sizes=True)
    a, b = rng.sample(objs, 2)
    if rng.random() < 0.5:
        return scenes.scene(rng, size, objs), f"What colour is the {a.shape}?" + SHORT, colour
    return scenes.scene(rng, size, objs), f"What shape is next to the {a.shape}?" + SHORT, b.shape


def make_vizwiz(rng: random.Random, size: int, split: str, i: int) -> Sample:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    objs = scenes.place_objects(rng, size, [(shape, colour)], sizes=(26, 32, 38))
    img = scenes.scene(rng, size, objs)
    q = ("What shape is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'."
         + SHORT)
    if rng.random() < 0.4:
        return scenes.obscure(rng, img), q, "unanswerable"
    return img, q, shape


def _in_cells(rng: random.Random, size: int, specs: Sequence[tuple[str, str]]) -> list[tuple[scenes.Obj, int]]:
    """Each shape centred (with jitter) in its own cell of a 3x3 grid; returns (object, cell index) pairs."""
    cell = size / 3
    out = []
    for (shape, colour), c in zip(specs, rng.sample(range(9), len(specs))):
        s = int(round(rng.choice((16, 20)) * size / 64))
        cx = (c % 3 + 0.5) * cell + rng.uniform(-cell / 8, cell / 8)
        cy = (c // 3 + 0.5) * cell + rng.uniform(-cell / 8, cell / 8)
        x, y = int(round(cx - s / 2)), int(round(cy - s / 2))
        out.append((scenes.Obj(shape, colour, (x, y, x + s, y + s)), c))
    return out


def make_grounding(rng: random.Random, size: int, split: str, i: int) -> Sample:
    # the named object's cell of a 3x3 grid: a box quantised to the grid, a region answer a small LM can produce
    (t, cell), = _in_cells(rng, size, _distinct_specs(rng, 1))
    name = rng.choice([f"the {t.colour} {t.shape}", f"the {t.colour} object", f"the {t.shape}"])
    q = f"Which region of a 3x3 grid holds {name}? Answer like 'top left' or 'center'."
    return scenes.scene(rng, size, [t]), q, POSITIONS_3x3[cell]


def make_vqav2(rng: random.Random, size: int, split: str, i: int) -> Sample:
    if rng.random() < 0.5:  # counting
        k = rng.randint(1, 3)
        objs = scenes.place_objects(rng, size, _distinct_specs(rng, k, distinct_shapes=False), sizes=(12, 16, 20))
        return scenes.scene(rng, size, objs), "How many objects are there?" + SHORT, str(k)
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    objs = scenes.place_objects(rng, size, [(shape, colour)], sizes=(24, 28, 32))
    return scenes.scene(rng, size, objs), f"What color is the {shape}?" + SHORT, colour


def make_ocrvqa(rng: random.Random, size: int, split: str, i: int) -> Sample:
    title = rng.choice(BOOK_TITLES)
    genre = rng.choice(list(GENRES))
    cover = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in GENRES[genre])
    img = scenes.book_cover(rng, size, title, cover)
    if rng.random() < 0.6:
        return img, "What is the title of this book?" + SHORT, title
    return img, "What is the genre of this book?" + SHORT, genre


TASKS: dict[str, TaskSpec] = {
    "ScienceQA": TaskSpec("ScienceQA", "choice", make_scienceqa, "multiple choice over a diagram (which shape)"),
    "TextVQA": TaskSpec("TextVQA", "exact", make_textvqa, "read the word on a sign"),
    "ImageNet": TaskSpec("ImageNet", "exact", make_imagenet, "classify a handwritten digit (sklearn digits)"),
    "GQA": TaskSpec("GQA", "exact", make_gqa, "colour of a named shape, or the shape next to it, in a 2-shape scene"),
    "VizWiz": TaskSpec("VizWiz", "exact", make_vizwiz, "name the shape, or 'unanswerable' for dark/blurred photos"),
    "Grounding": TaskSpec("Grounding", "exact", make_grounding, "3x3-grid region of the named shape"),
    "VQAv2": TaskSpec("VQAv2", "exact", make_vqav2, "counting and colour questions"),
    "OCR-VQA": TaskSpec("OCR-VQA", "exact", make_ocrvqa, "title and genre of a book cover"),
}


# ------------------------------------------------------------------------------------------------------ writer
def _task_seed(seed: int, name: str, split: str) -> int:
    # str hash() is salted per process; a fixed mix keeps generation reproducible across runs.
    h = 1469598103934665603
    for ch in f"{seed}/{name}/{split}":
        h = ((h ^ ord(ch)) * 1099511628211) % (1 << 64)
    return h


def _records(spec: TaskSpec, seed: int, split: str, n: int, size: int, task_dir: Path) -> list[dict]:
    rng = random.Random(_task_seed(seed, spec.name, split))
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img, q, a = spec.make(rng, size, split, i)
        rec: dict = {"id": f"{spec.name}-{split}-{i}"}
        if img is not None:
            rel = f"images/{split}_{i:05d}.png"
            img.save(task_dir / rel, optimize=False, compress_level=1)
            rec["image"] = rel
            q = "<image>\n" + q
        rec["conversations"] = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        out.append(rec)
    return out


def train_size(task: str, n_train: int) -> int:
    """Training samples of ``task`` when the benchmark is generated with ``n_train`` (see ``TRAIN_SCALE``)."""
    return max(1, round(n_train * TRAIN_SCALE[task]))


def manifest_for(seed: int, n_train: int, n_test: int, image_size: int, tasks: Sequence[str]) -> dict:
    return {"benchmark": "coin-mini", "version": VERSION, "seed": seed, "n_train": n_train, "n_test": n_test,
            "image_size": image_size, "tasks": {t: TASKS[t].scorer for t in tasks},
            "train_sizes": {t: train_size(t, n_train) for t in tasks}}


def generate(root: str | os.PathLike, *, seed: int = 0, n_train: int = 256, n_test: int = 300,
             image_size: int = 128, tasks: Optional[Sequence[str]] = None, force: bool = False) -> CoinMini:
    """Write CoIN-mini under ``root`` (or reuse it when ``root/manifest.json`` matches) and describe its files.

    The whole directory is written next to ``root`` and renamed into place, so an interrupted generation never
    leaves a half-written benchmark that a later run would take for a complete one.
    """
    names = list(tasks) if tasks is not None else list(TASK_ORDER)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown CoIN-mini task(s) {unknown}; known: {list(TASK_ORDER)}")
    root = Path(root).expanduser()
    manifest = manifest_for(seed, n_train, n_test, image_size, names)
    mpath = root / "manifest.json"
    reused = False
    if not force and mpath.is_file():
        try:
            reused = json.loads(mpath.read_text()) == manifest
        except (OSError, ValueError):
            reused = False
    if not reused:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            for name in names:
                spec, tdir = TASKS[name], tmp / name
                for split, n in (("train", train_size(name, n_train)), ("test", n_test)):
                    recs = _records(spec, seed, split, n, image_size, tdir)
                    (tdir / f"{split}.json").write_text(json.dumps(recs, indent=1))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    info = CoinMini(root=root, seed=seed, image_size=image_size, generated=not reused)
    for name in names:
        tdir = root / name
        info.tasks[name] = TaskFiles(name, TASKS[name].scorer, tdir, tdir / "train.json", tdir / "test.json",
                                     train_size(name, n_train), n_test)
    return info


def default_root(seed: int, n_train: int, n_test: int, image_size: int) -> Path:
    """Where generated data lives by default: outside any repository, one directory per configuration."""
    base = Path(os.environ.get("PCLR_CACHE", Path.home() / ".cache" / "pclr"))
    return base / "coin-mini" / f"v{VERSION}-seed{seed}-{n_train}x{n_test}-{image_size}px"


# --------------------------------------------------------------------------------------------------- baselines
_TEMPLATE_WORDS = frozenset([*COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), "left", "right", "largest", "smallest"])


def question_template(question: str) -> str:
    """The question with its variable words (colours, shapes, relations) blanked: questions that differ only in
    those words share a template (e.g. "What colour is the object to the _ of the _?")."""
    words = question.replace("?", " ?").replace(".", " .").split(" ")
    return " ".join("_" if w in _TEMPLATE_WORDS else w for w in words)


def _qa(path: Path) -> list[tuple[str, str]]:
    recs = json.loads(Path(path).read_text())
    return [(r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in recs]


def task_baselines(files: TaskFiles) -> dict[str, float]:
    """Chance and blind accuracy (percent) of one generated task on its test split.

    chance: mean over test questions of 1 / (number of distinct answers the task's training set gives to questions
        of the same template); the expected accuracy of a uniform guess among the admissible answers.
    blind: each template's most frequent training answer (ties: the alphabetically first; templates never seen in
        training: the task's most frequent answer), scored with the task's own scorer: what a text-only prior earns.
    """
    train, test = _qa(files.train_json), _qa(files.test_json)
    by_template: dict[str, Counter] = {}
    for q, a in train:
        by_template.setdefault(question_template(q), Counter())[a] += 1
    overall = Counter(a for _, a in train)
    score = get_scorer(files.scorer)

    def mode(c: Counter) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    chance = blind = 0.0
    for q, a in test:
        c = by_template.get(question_template(q), overall)
        chance += 1.0 / max(1, len(c))
        blind += score(mode(c), a)
    n = max(1, len(test))
    return {"chance": round(100 * chance / n, 2), "blind": round(100 * blind / n, 2)}


# --------------------------------------------------------------------------------------------------- intervals
def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy, in percent. ``correct`` may be fractional (soft scores)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (100 * max(0.0, centre - half), 100 * min(1.0, centre + half))


def difference_halfwidth(p1: float, p2: float, n: int, z: float = 1.96) -> float:
    """Half-width (percentage points) of a normal 95% interval of the difference of two accuracies (in percent)
    measured on independent sets of ``n`` samples: how large a gap must be to stand above sampling noise."""
    a, b = p1 / 100, p2 / 100
    return 100 * z * math.sqrt(max(a * (1 - a) + b * (1 - b), 1e-12) / n)
