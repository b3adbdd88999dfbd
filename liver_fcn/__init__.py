"""liver-fcn: FCN-8s / FCN-4s liver, bone and kidney segmentation of abdominal CT as a MONAI bundle."""

__version__ = "0.1.0"
