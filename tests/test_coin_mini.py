"""CoIN-mini generation: deterministic, cached by manifest, CoIN format, distinct tasks; interval helpers."""
import json

from pclr.demo.data.coin_mini import (
    TASK_ORDER,
    difference_halfwidth,
    generate,
    question_template,
    task_baselines,
    train_size,
    wilson_interval,
)
from pclr.demo.data.scenes import COLOURS, SHAPES, POSITIONS_3x3


def test_generate_is_deterministic_cached_and_coin_shaped(tmp_path):
    a = generate(tmp_path / "a", seed=3, n_train=4, n_test=3)
    b = generate(tmp_path / "b", seed=3, n_train=4, n_test=3)
    assert a.generated and list(a.tasks) == list(TASK_ORDER)
    for name, f in a.tasks.items():
        recs = json.loads(f.train_json.read_text())
        assert len(recs) == train_size(name, 4) == f.n_train and len(json.loads(f.test_json.read_text())) == 3
        assert recs == json.loads(b.tasks[name].train_json.read_text())
        r = recs[0]
        assert set(r) == {"id", "image", "conversations"}
        assert r["conversations"][0]["from"] == "human" and r["conversations"][0]["value"].startswith("<image>\n")
        assert r["conversations"][1]["from"] == "gpt" and r["conversations"][1]["value"]
        assert (f.root / r["image"]).read_bytes() == (b.tasks[name].root / r["image"]).read_bytes()
        assert f.scorer in ("exact", "choice", "grounding")
    again = generate(tmp_path / "a", seed=3, n_train=4, n_test=3)
    assert not again.generated  # same manifest: reused
    assert generate(tmp_path / "a", seed=4, n_train=4, n_test=3).generated  # another seed: regenerated


def test_tasks_have_distinct_answer_vocabularies(tmp_path):
    info = generate(tmp_path, seed=0, n_train=40, n_test=1)
    vocab = {n: {r["conversations"][1]["value"] for r in json.loads(f.train_json.read_text())}
             for n, f in info.tasks.items()}
    assert vocab["ScienceQA"] <= {"A", "B", "C", "D"}
    assert vocab["Grounding"] <= set(POSITIONS_3x3) and len(vocab["Grounding"]) > 3
    assert not vocab["TextVQA"] & vocab["ImageNet"]
    assert vocab["VQAv2"] <= {"1", "2", "3", *COLOURS} and {"1", "2", "3"} <= vocab["VQAv2"]
    assert vocab["GQA"] <= {*COLOURS, *SHAPES}


def test_gqa_asks_for_the_attribute_it_does_not_name(tmp_path):
    info = generate(tmp_path, seed=1, n_train=30, n_test=1, tasks=["GQA"])
    for r in json.loads(info.tasks["GQA"].train_json.read_text()):
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        asks_colour = "What colour is the" in q
        assert (a in COLOURS) == asks_colour and (a in SHAPES) == (not asks_colour)
        assert a not in q.replace("<image>", "").split("?")[0].split()  # the answer is never in the question


def test_train_sizes_follow_the_scale():
    assert train_size("ScienceQA", 80) == 160 and train_size("VizWiz", 80) == 40 and train_size("VizWiz", 1) == 1
    assert all(train_size(t, 8) >= 1 for t in TASK_ORDER)


def test_intervals():
    lo, hi = wilson_interval(50, 100)
    assert 40 < lo < 50 < hi < 60
    assert wilson_interval(0, 10)[0] == 0.0
    assert 4.0 < difference_halfwidth(50, 50, 800) < 5.0


def test_question_templates_blank_the_variable_words():
    a = question_template("What colour is the object to the left of the circle?")
    assert a == question_template("What colour is the object to the right of the diamond?")
    assert a != question_template("What shape is the red object?")


def test_baselines_chance_and_blind(tmp_path):
    info = generate(tmp_path, seed=0, n_train=60, n_test=40)
    for name, f in info.tasks.items():
        b = task_baselines(f)
        assert 0 < b["chance"] <= 50 and 0 <= b["blind"] <= 60, (name, b)
    # the blind answer of a template is its most frequent training answer: VizWiz's is "unanswerable"
    recs = json.loads(info.tasks["VizWiz"].test_json.read_text())
    share = sum(r["conversations"][1]["value"] == "unanswerable" for r in recs) / len(recs)
    assert task_baselines(info.tasks["VizWiz"])["blind"] == round(100 * share, 2)
