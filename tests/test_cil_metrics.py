"""Accuracy-matrix metrics, scorers and the CoIN collator."""
import math

import torch

from pclr.cil.data import CoINCollator
from pclr.cil.metrics import CILResults, score_choice, score_exact, score_grounding, summarize
from pclr.models.tiny import tiny_llava

NAN = float("nan")


def test_summary_metrics():
    m = [[80, NAN, NAN], [60, 70, NAN], [50, 65, 90]]
    s = summarize(m)
    assert math.isclose(s["new_acc"], (80 + 70 + 90) / 3)
    assert math.isclose(s["avg_acc"], (50 + 65 + 90) / 3)
    assert math.isclose(s["forgetting"], ((80 - 50) + (70 - 65)) / 2)
    assert math.isclose(s["bwt"], ((50 - 80) + (65 - 70)) / 2)
    r = CILResults(["a", "b", "c"], m, method="pclr")
    assert CILResults.from_dict(r.to_dict()).summary == r.summary
    assert "| New.ACC |" in r.markdown()


def test_scorers():
    assert score_exact("The Red.", "red") == 1.0 and score_exact("blue", "red") == 0.0
    assert score_exact("3.5", "3.5") == 1.0
    assert score_choice("(B) blue", "B") == 1.0 and score_choice("The answer is C.", "C. red") == 1.0
    assert score_choice("A", "B") == 0.0
    assert score_grounding("[0.1, 0.1, 0.5, 0.5]", "[0.12, 0.1, 0.5, 0.52]") == 1.0
    assert score_grounding("[0.6, 0.6, 0.9, 0.9]", "[0.1, 0.1, 0.5, 0.5]") == 0.0
    assert score_grounding("no box", "[0.1, 0.1, 0.5, 0.5]") == 0.0


def test_collator_labels_only_answers_and_instruction_mask():
    from PIL import Image

    b = tiny_llava()
    samples = [{"id": 0, "image": Image.new("RGB", (20, 20), (255, 0, 0)),
                "conversations": [{"from": "human", "value": "<image>\nwhat color is the box ?"},
                                  {"from": "gpt", "value": "red"}]},
               {"id": 1, "conversations": [{"from": "human", "value": "what shape ?"},
                                           {"from": "gpt", "value": "a circle"}]}]
    out = CoINCollator(b, "train")(samples)
    tok = b.tokenizer
    ans = [tok.convert_ids_to_tokens(out["input_ids"][i][out["labels"][i] != -100].tolist()) for i in range(2)]
    assert ans == [["red", "</s>"], ["a", "circle", "</s>"]]
    ins = [tok.convert_ids_to_tokens(out["input_ids"][i][out["instruction_mask"][i]].tolist()) for i in range(2)]
    assert ins == [["what", "color", "is", "the", "box", "?"], ["what", "shape", "?"]]
    assert int((out["input_ids"][0] == b.image_token_id).sum()) == b.num_image_tokens
    assert out["has_image"].tolist() == [True, False] and out["pixel_values"].shape == (1, 3, 16, 16)
    expect = (torch.tensor([1.0, 0, 0]) - torch.tensor(b.image_mean)) / torch.tensor(b.image_std)
    torch.testing.assert_close(out["pixel_values"][0, :, 0, 0], expect)
    gen = CoINCollator(b, "generate")(samples)
    assert gen["answers"] == ["red", "a circle"] and gen["attention_mask"][1, 0] == 0  # left padded


def test_coin_json_with_image_root(tmp_path):
    import json

    from PIL import Image

    from pclr.cil.data import CoINDataset

    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 24), (0, 0, 255)).save(tmp_path / "img" / "a.png")
    data = [{"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat color ?"},
                                                            {"from": "gpt", "value": "blue"}]}]
    (tmp_path / "train.json").write_text(json.dumps(data))
    ds = CoINDataset(str(tmp_path / "train.json"), image_root=str(tmp_path / "img"))
    b = tiny_llava()
    out = CoINCollator(b, "train")([ds[0]])
    expect = (torch.tensor([0.0, 0, 1]) - torch.tensor(b.image_mean)) / torch.tensor(b.image_std)
    torch.testing.assert_close(out["pixel_values"][0, :, 5, 5], expect)
    assert out["has_image"].tolist() == [True]
