"""FCN family: geometry, output size, initialisation, ImageNet VGG16 import."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from liver_fcn.errors import InputError
from liver_fcn.networks import FCN, bilinear_kernel, crop_offsets, load_vgg16_weights
from liver_fcn.networks.fcn import VGG16_CONFIG


def plain_vgg16(num_classes: int = 1000) -> nn.Module:
    """VGG16 with torchvision's module layout, built here (torchvision is not a dependency)."""
    layers, c = [], 3
    for v in VGG16_CONFIG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(True)]
            c = v
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d(7)
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(4096, 4096),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(4096, num_classes),
    )
    return model


@pytest.fixture(scope="module")
def vgg_state():
    torch.manual_seed(0)
    model = plain_vgg16().eval()
    for m in model.modules():  # non-trivial weights so that sign or layout mistakes show
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0, (2.0 / m.weight[0].numel()) ** 0.5)
            nn.init.normal_(m.bias, 0, 0.1)
    return model, model.state_dict()


def test_reference_offsets_match_the_published_fcns():
    assert crop_offsets("32s", "reference") == {"final": 19}
    assert crop_offsets("16s", "reference") == {"pool4": 5, "final": 27}
    assert crop_offsets("8s", "reference") == {"pool4": 5, "pool3": 9, "final": 31}
    assert crop_offsets("4s", "reference") == {"pool4": 5, "pool3": 9, "pool2": 17, "final": 33}
    for v in ("32s", "16s", "8s", "4s"):
        assert set(crop_offsets(v, "aligned").values()) == {0}


@pytest.mark.parametrize("padding", ["aligned", "reference"])
@pytest.mark.parametrize("variant", ["32s", "16s", "8s", "4s"])
def test_output_is_exactly_the_input_size(variant, padding):
    net = FCN(variant, in_channels=1, out_channels=3, width=1 / 16, padding=padding).eval()
    for h, w in [(32, 32), (97, 131), (64, 33), (150, 100)]:
        with torch.no_grad():
            assert net(torch.randn(2, 1, h, w)).shape == (2, 3, h, w)


def test_too_small_input_is_refused():
    with pytest.raises(ValueError, match="at least 32x32"):
        FCN("8s", width=1 / 16)(torch.randn(1, 1, 31, 64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        FCN("2s")
    with pytest.raises(ValueError, match="padding"):
        FCN("8s", padding="same")


def test_score_layers_start_at_zero_and_upsamplers_are_frozen_bilinear():
    net = FCN("4s", out_channels=4, width=1 / 16).eval()
    with torch.no_grad():
        assert torch.count_nonzero(net(torch.randn(1, 1, 64, 64))) == 0
    for name in ("score_fr", "score_pool4", "score_pool3", "score_pool2"):
        assert torch.count_nonzero(getattr(net, name).weight) == 0
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 4 and all(not m.weight.requires_grad for m in ups)
    assert torch.equal(net.upscore4.weight, bilinear_kernel(4, 8))
    trainable = FCN("8s", width=1 / 16, learn_upsampling=True)
    assert all(m.weight.requires_grad for m in trainable.modules() if isinstance(m, nn.ConvTranspose2d))


def test_bilinear_kernel_upsamples_like_bilinear_interpolation():
    x = torch.rand(1, 2, 8, 8)
    up = F.conv_transpose2d(x, bilinear_kernel(2, 4), stride=2, padding=1)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(up[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-6)


def test_aligned_and_reference_see_the_same_pixels():
    """A point in the input moves the output most at the same place in both geometries."""
    for padding in ("aligned", "reference"):
        net = FCN("8s", out_channels=2, width=1 / 16, padding=padding, dropout=0.0).eval()
        for m in net.modules():
            if isinstance(m, nn.Conv2d) and m.out_channels == 2:
                nn.init.constant_(m.weight, 0.01)
        x = torch.zeros(1, 1, 96, 96)
        x[..., 40, 56] = 1.0
        with torch.no_grad():
            diff = (net(x) - net(torch.zeros_like(x))).abs().sum(1)[0]
        peak = divmod(int(diff.argmax()), 96)
        assert abs(peak[0] - 40) <= 8 and abs(peak[1] - 56) <= 8, (padding, peak)


def test_training_step_reaches_every_trainable_layer():
    net = FCN("4s", out_channels=4, width=1 / 16, dropout=0.0)
    nn.init.normal_(net.score_fr.weight, 0, 0.1)
    for s in ("pool4", "pool3", "pool2"):
        nn.init.normal_(getattr(net, f"score_{s}").weight, 0, 0.1)
    loss = F.cross_entropy(net(torch.randn(2, 1, 64, 64)), torch.randint(0, 4, (2, 64, 64)))
    loss.backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_vgg16_import_gives_the_plain_vgg16_features(vgg_state):
    vgg, sd = vgg_state
    net = FCN("8s", in_channels=3, out_channels=4, width=1.0, padding="aligned").eval()
    loaded = load_vgg16_weights(net, sd, rgb=True)
    assert "fc6.0.weight" in loaded and "features.0.weight" in loaded
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = net.backbone(x)
        ref = vgg.features(x)
        assert torch.allclose(feats["pool5"], ref, atol=1e-4)
        # fc6/fc7 as convolutions: at the centre of the 7x7 pool5 map they equal the classifier
        fc = vgg.classifier[4](vgg.classifier[3](vgg.classifier[1](vgg.classifier[0](torch.flatten(ref, 1)))))
        assert torch.allclose(feats["fc7"][0, :, 3, 3], fc[0], atol=1e-3, rtol=1e-3)


def test_single_channel_import_equals_the_grey_image_in_imagenet_normalisation(vgg_state):
    vgg, sd = vgg_state
    net = FCN("8s", in_channels=1, width=1.0).eval()
    load_vgg16_weights(net, sd)
    x = torch.randn(1, 1, 64, 64)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net.backbone(x)["pool5"], vgg.features(x / std), atol=1e-4)
    three = FCN("8s", in_channels=3, width=1.0).eval()
    load_vgg16_weights(three, sd)
    with torch.no_grad():  # three identical slices respond as one
        assert torch.allclose(three.backbone(x.repeat(1, 3, 1, 1))["pool5"], net.backbone(x)["pool5"], atol=1e-4)


def test_vgg16_import_from_a_local_file_and_its_errors(vgg_state, tmp_path, monkeypatch):
    _, sd = vgg_state
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(sd, path)
    net = FCN("8s", width=1.0, pretrained=str(path))
    assert torch.allclose(net.fc7[0].weight.view(4096, 4096), sd["classifier.3.weight"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nohome"))
    with pytest.raises(InputError, match="vgg16-397923af.pth"):
        FCN("8s", width=1.0, pretrained=True)
    (tmp_path / "nohome" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(sd, tmp_path / "nohome" / "hub" / "checkpoints" / "vgg16-397923af.pth")
    FCN("8s", width=1.0, pretrained=True)
    with pytest.raises(InputError, match="does not exist"):
        FCN("8s", width=1.0, pretrained=str(tmp_path / "missing.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not a torchvision VGG16"):
        FCN("8s", width=1.0, pretrained=str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        FCN("8s", width=1.0, pretrained=str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match="width=1.0"):
        load_vgg16_weights(FCN("8s", width=0.5), sd)


def test_coarser_checkpoint_loads_into_finer_variant():
    coarse = FCN("16s", width=1 / 16)
    fine = FCN("8s", width=1 / 16)
    missing, unexpected = fine.load_state_dict(coarse.state_dict(), strict=False)
    assert set(unexpected) == {"upscore16.weight"}
    assert all(k.startswith(("score_pool3", "upscore_pool4", "upscore8")) for k in missing)
