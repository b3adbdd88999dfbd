"""FCN family on VGG16 and the import of ImageNet VGG16 weights."""

from liver_fcn.networks.fcn import FCN, VARIANTS, bilinear_kernel, coordinate_map, crop_offsets
from liver_fcn.networks.vgg import find_vgg16_weights, load_vgg16_weights, vgg16_to_fcn

__all__ = [
    "FCN",
    "VARIANTS",
    "bilinear_kernel",
    "coordinate_map",
    "crop_offsets",
    "find_vgg16_weights",
    "load_vgg16_weights",
    "vgg16_to_fcn",
]
