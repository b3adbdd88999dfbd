"""FCN family on VGG16, ensembles of trained networks, the import of ImageNet VGG16 weights, and the
precision a network runs in."""

from liver_fcn.networks.ensemble import Ensemble
from liver_fcn.networks.fcn import FCN, VARIANTS, bilinear_kernel, coordinate_map, crop_offsets
from liver_fcn.networks.precision import Precision, default_device, native_bf16, resolve_precision
from liver_fcn.networks.vgg import find_vgg16_weights, load_vgg16_weights, vgg16_to_fcn

__all__ = [
    "FCN",
    "Ensemble",
    "VARIANTS",
    "Precision",
    "bilinear_kernel",
    "coordinate_map",
    "crop_offsets",
    "default_device",
    "find_vgg16_weights",
    "load_vgg16_weights",
    "native_bf16",
    "resolve_precision",
    "vgg16_to_fcn",
]
