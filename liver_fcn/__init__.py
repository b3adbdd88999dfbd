"""liver-fcn: FCN-8s / FCN-4s liver, bone and kidney segmentation of abdominal CT as a MONAI bundle."""

__version__ = "0.6.0"  # the package and the bundle (configs/metadata.json) share it

#: the classes of the shipped recipe, background first: the one definition the code defaults to
#: (a prepared datalist records its own, and train.json reads them from it)
CLASS_NAMES: tuple[str, ...] = ("background", "liver", "bone", "kidney")
