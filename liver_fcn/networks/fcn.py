"""Fully convolutional networks (FCN-32s/16s/8s/4s) on a VGG16 backbone.

MONAI ships encoder-decoder segmentation networks (UNet, SegResNet, ...) but not the FCN family of
Long, Shelhamer and Darrell, which is what the liver paper uses. This module is that family, kept
close to the reference (Caffe) definition:

* ``features`` is VGG16's convolutional part with torchvision's indices (``features.0`` is conv1_1,
  ``features.28`` is conv5_3), so ImageNet weights load by name; ``fc6``/``fc7`` are the classifier's
  fully connected layers turned into 7x7 and 1x1 convolutions.
* a 1x1 ``score_fr`` convolution, and for the finer variants 1x1 ``score_pool4`` / ``score_pool3`` /
  ``score_pool2`` convolutions on the skips, all zero-initialised;
* transposed convolutions initialised to bilinear interpolation kernels and frozen by default.

Two geometries are offered. ``padding="reference"`` is the published one: conv1_1 pads by 100,
pooling rounds up, ``fc6`` and the transposed convolutions do not pad, and each skip is cropped
by an offset (5 at pool4, 9 at pool3, 31 at the end for FCN-8s). ``padding="aligned"`` (default)
pads every 3x3 conv by 1, ``fc6`` by 3 and each 2s x 2s transposed conv by s/2, so that every
skip lines up at offset 0 when the input is a multiple of 32; other sizes are zero-padded at the
end up to the next multiple of 32 and cropped back. It computes the same kind of function with
far less work (conv1 runs on the image, not on a 200-pixel margin).

In both geometries the offsets are derived from the layers' kernel, stride and padding by
:func:`coordinate_map` rather than written down, and the output is exactly the input's H x W.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from liver_fcn.networks.vgg import load_vgg16_weights

__all__ = ["FCN", "VARIANTS", "VGG16_CONFIG", "bilinear_kernel", "coordinate_map", "crop_offsets"]

#: VGG16 (configuration "D"): output channels of each 3x3 conv, "M" for a 2x2 max pool.
VGG16_CONFIG: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

#: variant -> (output stride, skips fused from coarse to fine)
VARIANTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "32s": (32, ()),
    "16s": (16, ("pool4",)),
    "8s": (8, ("pool4", "pool3")),
    "4s": (4, ("pool4", "pool3", "pool2")),
}
_POOL_STRIDE = {"pool2": 4, "pool3": 8, "pool4": 16, "pool5": 32}
PADDINGS = ("aligned", "reference")


@dataclass(frozen=True)
class CoordMap:
    """Feature index ``i`` of a map sits at input pixel ``scale * i + shift`` (receptive-field centre)."""

    scale: float
    shift: float

    def conv(self, kernel: int, stride: int, pad: int) -> CoordMap:
        return CoordMap(self.scale * stride, self.shift + self.scale * (-pad + (kernel - 1) / 2))

    def deconv(self, kernel: int, stride: int, pad: int) -> CoordMap:
        return CoordMap(self.scale / stride, self.shift + self.scale * (pad - (kernel - 1) / 2) / stride)


def _layer_geometry(padding: str) -> dict:
    """Kernel, stride and padding of the layers that move coordinates, for one geometry."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    aligned = padding == "aligned"
    return {
        "conv1_1_pad": 1 if aligned else 100,
        "fc6_pad": 3 if aligned else 0,
        # transposed conv of stride s: kernel 2s, padding s/2 (aligned) or 0 (reference)
        "deconv_pad": (lambda s: s // 2) if aligned else (lambda s: 0),
        "ceil_mode": not aligned,
    }


def coordinate_map(padding: str = "aligned") -> dict[str, CoordMap]:
    """Input coordinates of the feature maps of the network, computed layer by layer.

    Returns maps for ``pool2`` .. ``pool5`` and ``score_fr`` (fc7 scores). Upsampled maps are
    derived in :func:`crop_offsets`.
    """
    geo = _layer_geometry(padding)
    cmap = CoordMap(1.0, 0.0)
    maps: dict[str, CoordMap] = {}
    pool = 0
    first = True
    for v in VGG16_CONFIG:
        if v == "M":
            cmap = cmap.conv(2, 2, 0)
            pool += 1
            if pool >= 2:
                maps[f"pool{pool}"] = cmap
        else:
            cmap = cmap.conv(3, 1, geo["conv1_1_pad"] if first else 1)
            first = False
    cmap = cmap.conv(7, 1, geo["fc6_pad"])  # fc6; fc7 and score_fr are 1x1
    maps["score_fr"] = cmap
    return maps


def _offset(larger: CoordMap, smaller: CoordMap) -> int:
    """Crop offset ``o`` so that ``larger[j + o]`` and ``smaller[j]`` sit at the same input pixel."""
    if not np.isclose(larger.scale, smaller.scale):
        raise AssertionError(f"cannot align maps of scales {larger.scale} and {smaller.scale}")
    o = (smaller.shift - larger.shift) / larger.scale
    if not np.isclose(o, round(o)) or round(o) < 0:
        raise AssertionError(f"maps do not align on the pixel grid (offset {o})")
    return int(round(o))


def crop_offsets(variant: str = "8s", padding: str = "aligned") -> dict[str, int]:
    """Crop offsets of every fusion of a variant, derived from layer geometry.

    Keys are the skip names (the skip's score map is cropped by that offset before it is added
    to the upsampled coarser scores) and ``"final"`` (the last upsampled map is cropped by that
    offset to the input). For the reference geometry this gives the published values
    (FCN-32s: final 19; FCN-16s: pool4 5, final 27; FCN-8s: 5, 9, 31; FCN-4s: 5, 9, 17, 33).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    geo = _layer_geometry(padding)
    out_stride, skips = VARIANTS[variant]
    maps = coordinate_map(padding)
    cur = maps["score_fr"]
    offsets: dict[str, int] = {}
    for skip in skips:
        cur = cur.deconv(4, 2, geo["deconv_pad"](2))
        offsets[skip] = _offset(maps[skip], cur)
        cur = CoordMap(cur.scale, cur.shift)  # the fused map keeps the upsampled map's coordinates
    final = cur.deconv(2 * out_stride, out_stride, geo["deconv_pad"](out_stride))
    offsets["final"] = _offset(final, CoordMap(1.0, 0.0))
    return offsets


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Weights of a transposed convolution that performs per-channel bilinear upsampling."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = np.ogrid[:kernel_size, :kernel_size]
    filt = (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)
    weight = np.zeros((channels, channels, kernel_size, kernel_size), dtype=np.float32)
    weight[range(channels), range(channels)] = filt
    return torch.from_numpy(weight)


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class Float32ConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution that runs in float32, outside any autocast region.

    PyTorch's CPU bfloat16 transposed convolution returns wrong input gradients for kernels of 16
    and more (the stride-8, -16 and -32 upsamplers: gradient cosine about 0.2 against float32), which
    would corrupt every gradient upstream of it in bf16 training. The upsamplers have one channel
    per class, so float32 costs little. Its parameters are those of ``nn.ConvTranspose2d``.
    """

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.conv_transpose2d(
                input.float(),
                self.weight,
                self.bias,
                self.stride,
                self.padding,
                self.output_padding,
                self.groups,
                self.dilation,
            )
        with torch.autocast(input.device.type, enabled=False):
            return F.conv_transpose2d(
                input.float(),
                self.weight.float(),
                self.bias,
                self.stride,
                self.padding,
                self.output_padding,
                self.groups,
                self.dilation,
            )


class FCN(nn.Module):
    """FCN-32s/16s/8s/4s semantic segmentation network on VGG16.

    Args:
        variant: ``"32s"``, ``"16s"``, ``"8s"`` (the paper's FCN-8s) or ``"4s"`` (one more skip, from pool2).
        in_channels: 1 for a CT slice; more to stack adjacent slices as context.
        out_channels: number of classes (background included).
        width: channel multiplier; 1.0 is VGG16 (and required for ImageNet weights), 0.25 trains on a CPU.
        padding: ``"aligned"`` (default, pad-free skips) or ``"reference"`` (conv1_1 pad 100 and crops).
        dropout: dropout probability after fc6 and fc7 (0.5 in the reference).
        learn_upsampling: let the bilinear transposed convolutions train (frozen in the reference).
        pretrained: path of a torchvision-layout ImageNet VGG16 state dict to initialise the backbone,
            ``True`` to look for ``vgg16-397923af.pth`` in ``$TORCH_HOME/hub/checkpoints``, or None.
        settings: the checkpoint's settings (see :mod:`liver_fcn.checkpoint`), kept as the JSON text
            ``self.settings`` so that a TorchScript export carries them.

    Input ``(N, in_channels, H, W)`` with H, W >= 32; output ``(N, out_channels, H, W)`` logits.
    """

    def __init__(
        self,
        variant: str = "8s",
        in_channels: int = 1,
        out_channels: int = 4,
        width: float = 1.0,
        padding: str = "aligned",
        dropout: float = 0.5,
        learn_upsampling: bool = False,
        pretrained: str | bool | None = None,
        settings: dict | None = None,
    ) -> None:
        super().__init__()
        # what the network was trained with (pixel spacing, HU window ...): kept as JSON text, which
        # TorchScript saves with the module, so an exported network still describes its preprocessing
        self.settings = json.dumps(dict(settings), sort_keys=True) if settings else ""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        geo = _layer_geometry(padding)
        self.variant, self.padding, self.width = variant, padding, float(width)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.out_stride, self.skips = VARIANTS[variant]
        self.offsets = crop_offsets(variant, padding)

        layers: list[nn.Module] = []
        c_in, first = self.in_channels, True
        for v in VGG16_CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=geo["ceil_mode"]))
            else:
                c_out = _ch(v, width)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=geo["conv1_1_pad"] if first else 1), nn.ReLU(True)]
                c_in, first = c_out, False
        self.features = nn.Sequential(*layers)
        c_fc = _ch(4096, width)
        self.fc6 = nn.Sequential(nn.Conv2d(c_in, c_fc, 7, padding=geo["fc6_pad"]), nn.ReLU(True), nn.Dropout2d(dropout))
        self.fc7 = nn.Sequential(nn.Conv2d(c_fc, c_fc, 1), nn.ReLU(True), nn.Dropout2d(dropout))
        self.score_fr = nn.Conv2d(c_fc, out_channels, 1)
        skip_channels = {"pool4": _ch(512, width), "pool3": _ch(256, width), "pool2": _ch(128, width)}
        for skip in self.skips:
            setattr(self, f"score_{skip}", nn.Conv2d(skip_channels[skip], out_channels, 1))
        # 2x upsamplers before each skip; the final upsampler is named after its stride so that a
        # coarser variant's checkpoint shares every name it can with a finer one.
        for name in ["upscore_fr", "upscore_pool4", "upscore_pool3"][: len(self.skips)]:
            setattr(self, name, self._upsampler(2, geo["deconv_pad"](2)))
        setattr(self, f"upscore{self.out_stride}", self._upsampler(self.out_stride, geo["deconv_pad"](self.out_stride)))
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                m.weight.requires_grad_(bool(learn_upsampling))
        self._init_backbone()
        self._init_scores()
        if isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none", "null", "false"):
            pretrained = None  # as a command line gives it
        if pretrained:
            auto = pretrained is True or str(pretrained).strip().lower() == "true"
            load_vgg16_weights(self, None if auto else pretrained)

    def _upsampler(self, stride: int, pad: int) -> nn.ConvTranspose2d:
        up = Float32ConvTranspose2d(self.out_channels, self.out_channels, 2 * stride, stride, pad, bias=False)
        with torch.no_grad():
            up.weight.copy_(bilinear_kernel(self.out_channels, 2 * stride))
        return up

    def _init_backbone(self) -> None:
        """He initialisation as torchvision's VGG (used when no ImageNet weights are loaded)."""
        for m in [*self.features.modules(), *self.fc6.modules(), *self.fc7.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _init_scores(self) -> None:
        for name in ["score_fr", *[f"score_{s}" for s in self.skips]]:
            conv = getattr(self, name)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def pools(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """pool2, pool3, pool4 and pool5 of the VGG16 backbone (no input padding applied)."""
        pool2, pool3, pool4 = x, x, x
        for i, layer in enumerate(self.features):  # torchvision layout: pool2 is layer 9, pool3 16, pool4 23
            x = layer(x)
            if i == 9:
                pool2 = x
            elif i == 16:
                pool3 = x
            elif i == 23:
                pool4 = x
        return pool2, pool3, pool4, x

    @torch.jit.unused
    def backbone(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone's feature maps by name: pool2..pool5 and fc7."""
        feats = dict(zip(("pool2", "pool3", "pool4", "pool5"), self.pools(x)))
        feats["fc7"] = self.fc7(self.fc6(feats["pool5"]))
        return feats

    @staticmethod
    def _crop(x: torch.Tensor, offset: int, h: int, w: int) -> torch.Tensor:
        if x.shape[-2] < offset + h or x.shape[-1] < offset + w:
            raise RuntimeError(
                "FCN: a score map is too small to crop " + str(h) + "x" + str(w) + " at offset " + str(offset)
            )
        return x[..., offset : offset + h, offset : offset + w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Written for TorchScript as well (``monai.bundle ckpt_export`` scripts it): the skips a variant
        has are found with ``hasattr``, which TorchScript resolves when it compiles."""
        h, w = x.shape[-2], x.shape[-1]
        if h < 32 or w < 32:
            raise ValueError("FCN input must be at least 32x32 pixels, got " + str(h) + "x" + str(w))
        if self.padding == "aligned":  # up to a multiple of 32; padded even by 0, so that an ONNX export
            x = F.pad(x, [0, (32 - w % 32) % 32, 0, (32 - h % 32) % 32])  # with dynamic sizes keeps the step
        pool2, pool3, pool4, pool5 = self.pools(x)
        score = self.score_fr(self.fc7(self.fc6(pool5)))
        if hasattr(self, "score_pool4"):
            score = self.upscore_fr(score)
            score = score + self._crop(self.score_pool4(pool4), self.offsets["pool4"], score.shape[-2], score.shape[-1])
        if hasattr(self, "score_pool3"):
            score = self.upscore_pool4(score)
            score = score + self._crop(self.score_pool3(pool3), self.offsets["pool3"], score.shape[-2], score.shape[-1])
        if hasattr(self, "score_pool2"):
            score = self.upscore_pool3(score)
            score = score + self._crop(self.score_pool2(pool2), self.offsets["pool2"], score.shape[-2], score.shape[-1])
        if hasattr(self, "upscore4"):
            score = self.upscore4(score)
        elif hasattr(self, "upscore8"):
            score = self.upscore8(score)
        elif hasattr(self, "upscore16"):
            score = self.upscore16(score)
        else:
            score = self.upscore32(score)
        return self._crop(score, self.offsets["final"], h, w)

    def extra_repr(self) -> str:
        return f"variant={self.variant}, padding={self.padding}, width={self.width}, offsets={self.offsets}"
