"""Import of ImageNet VGG16 weights (torchvision layout) into :class:`~liver_fcn.networks.FCN`.

torchvision's ``vgg16`` state dict names its convolutions ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}``
and its fully connected layers ``classifier.{0,3,6}``. The FCN keeps the same ``features`` indices,
so the convolutions load by name; ``classifier.0`` (4096 x 25088) becomes the 7x7 convolution ``fc6``
(4096 x 512 x 7 x 7) and ``classifier.3`` becomes the 1x1 convolution ``fc7``. ``classifier.6``, the
1000-class ImageNet scorer, is dropped.

For a grey-level CT input, conv1_1's three colour filters are folded into one: each is divided by
the ImageNet standard deviation of its channel and they are summed. The network then responds to
a CT slice ``x`` (windowed to [0, 1], mean subtracted) exactly as the ImageNet network responds to
the colour image whose three channels are ``x / std_c``, i.e. a grey image normalised the
torchvision way, but at a third of conv1_1's cost. With ``k`` input channels (adjacent slices) the
folded filter is shared by the k channels and divided by k, so k identical slices give the same
response as one. ``rgb=True`` keeps the three colour filters untouched (three-channel input only).

Nothing is downloaded: the weights come from a local file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from liver_fcn.errors import InputError, reported

__all__ = ["IMAGENET_STD", "VGG16_FILENAME", "find_vgg16_weights", "load_vgg16_weights", "vgg16_to_fcn"]

IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_FILENAME = "vgg16-397923af.pth"
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def find_vgg16_weights() -> Path:
    """Path of torchvision's VGG16 file in ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch``)."""
    torch_home = Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch"))
    path = torch_home.expanduser() / "hub" / "checkpoints" / VGG16_FILENAME
    if not path.is_file():
        raise InputError(
            f"{path}: ImageNet VGG16 weights not found; download {VGG16_FILENAME} from torchvision's model "
            "zoo on a connected machine and copy it there, or pass its path"
        )
    return path


def _load_state_dict(source: str | os.PathLike | dict | None) -> tuple[dict, str]:
    if isinstance(source, dict):
        return source, "state dict"
    path = find_vgg16_weights() if source is None else Path(source)
    if not path.is_file():
        raise InputError(f"{path}: VGG16 weight file does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise InputError(f"{path}: cannot be read as a PyTorch state dict ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd, str(path)


def vgg16_to_fcn(state_dict: dict, in_channels: int = 1, rgb: bool = False, where: str = "state dict") -> dict:
    """Map a torchvision VGG16 state dict to the FCN's parameter names and shapes (width 1)."""
    expected = [f"features.{i}.{p}" for i in CONV_INDICES for p in ("weight", "bias")]
    expected += [f"classifier.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")]
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise InputError(f"{where}: not a torchvision VGG16 state dict (missing {', '.join(missing[:3])})")
    if tuple(state_dict["classifier.0.weight"].shape) != (4096, 512 * 7 * 7):
        raise InputError(
            f"{where}: classifier.0.weight has shape {tuple(state_dict['classifier.0.weight'].shape)}, "
            "expected (4096, 25088) as in VGG16"
        )
    out = {k: state_dict[k].detach().clone().float() for k in expected if k.startswith("features.")}
    w = out["features.0.weight"]  # (64, 3, 3, 3)
    if rgb:
        if in_channels != 3:
            raise ValueError("rgb=True needs in_channels=3")
    else:
        std = torch.tensor(IMAGENET_STD, dtype=w.dtype).view(1, 3, 1, 1)
        folded = (w / std).sum(dim=1, keepdim=True) / in_channels
        out["features.0.weight"] = folded.repeat(1, in_channels, 1, 1)
    out["fc6.0.weight"] = state_dict["classifier.0.weight"].float().view(4096, 512, 7, 7).clone()
    out["fc6.0.bias"] = state_dict["classifier.0.bias"].float().clone()
    out["fc7.0.weight"] = state_dict["classifier.3.weight"].float().view(4096, 4096, 1, 1).clone()
    out["fc7.0.bias"] = state_dict["classifier.3.bias"].float().clone()
    return out


@reported
def load_vgg16_weights(
    model: torch.nn.Module, source: str | os.PathLike | dict | None = None, rgb: bool = False
) -> list[str]:
    """Initialise an FCN's backbone from ImageNet VGG16 weights; returns the names loaded.

    ``source`` is a state dict, a file path, or None to look in ``$TORCH_HOME/hub/checkpoints``.
    The score and upsampling layers keep their own (zero / bilinear) initialisation.
    """
    if getattr(model, "width", 1.0) != 1.0:
        raise ValueError(f"ImageNet VGG16 weights need width=1.0, the network has width={model.width}")
    sd, where = _load_state_dict(source)
    if not isinstance(sd, dict):
        raise InputError(f"{where}: not a state dict (found {type(sd).__name__})")
    mapped = vgg16_to_fcn(sd, in_channels=model.in_channels, rgb=rgb, where=where)
    own = model.state_dict()
    for k, v in mapped.items():
        if own[k].shape != v.shape:
            raise InputError(f"{where}: {k} has shape {tuple(v.shape)}, the network expects {tuple(own[k].shape)}")
    model.load_state_dict(mapped, strict=False)
    return sorted(mapped)
