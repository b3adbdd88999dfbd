"""liver-fcn: FCN-8s / FCN-4s liver, bone and kidney segmentation of abdominal CT as a MONAI bundle.

``liver_fcn.segment(ct, checkpoint=..., device=...)`` segments one CT (see :mod:`liver_fcn.api`).
"""

import json
import sysconfig
from pathlib import Path

__version__ = "0.15.0"  # the package and the bundle (configs/metadata.json) share it

#: the classes of the shipped recipe, background first: the one definition the code defaults to
#: (a prepared datalist records its own, and train.json reads them from it)
CLASS_NAMES: tuple[str, ...] = ("background", "liver", "bone", "kidney")

#: the bundle folder of a source checkout (``bundle/`` beside the package)
SOURCE_BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
#: where ``pip install .`` puts the bundle (pyproject's ``data-files``)
INSTALLED_BUNDLE = Path(sysconfig.get_path("data")) / "share" / "liver-fcn" / "bundle"


def bundle_folder() -> Path:
    """The bundle the package ships: ``bundle/`` beside the package in a source checkout, else the copy
    that ``pip install .`` put under ``<prefix>/share/liver-fcn/bundle``."""
    for folder in (SOURCE_BUNDLE, INSTALLED_BUNDLE):
        if (folder / "configs" / "inference.json").is_file():
            return folder
    raise FileNotFoundError(f"{SOURCE_BUNDLE}, {INSTALLED_BUNDLE}: no bundle; set bundle_root to the bundle's folder")


def versions() -> dict[str, str]:
    """The package's version and the version of the bundle it runs (``configs/metadata.json``)."""
    meta = json.loads((bundle_folder() / "configs" / "metadata.json").read_text())
    return {"liver_fcn": __version__, "bundle": str(meta.get("version", "?"))}


def __getattr__(name: str):
    """``liver_fcn.segment``: the Python API, imported on first use so that ``import liver_fcn`` stays light."""
    if name == "segment":
        from liver_fcn.api import segment

        return segment
    raise AttributeError(f"module 'liver_fcn' has no attribute {name!r}")
