"""Where the bundle is, and the transform chains its configs share.

A MONAI bundle is a folder (``configs/``, ``models/``, ``docs/``); its configs build every path from
``bundle_root``. :func:`bundle_root` gives the folder of the config being run, so
``python -m monai.bundle run ... --config_file /any/where/bundle/configs/inference.json`` works from
any working directory. :class:`Pipeline` reads ``configs/pipeline.json`` from there: the one definition
of the data chain that training, evaluation, inference and the overlay script share.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from monai.bundle import ConfigParser, ConfigWorkflow

import liver_fcn.options  # noqa: F401  (pipeline.json's expressions name these modules)
import liver_fcn.transforms  # noqa: F401
from liver_fcn import bundle_folder


def running_workflow() -> ConfigWorkflow | None:
    """The ``ConfigWorkflow`` whose config is being evaluated (``python -m monai.bundle run``), if any."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            return candidate
        frame = frame.f_back
    return None


def running_parser() -> ConfigParser | None:
    """The ``ConfigParser`` evaluating the expression that called this (a workflow's or a bare one)."""
    frame = sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, ConfigParser):
                return value
            parser = getattr(value, "parser", None)
            if isinstance(parser, ConfigParser):
                return parser
        frame = frame.f_back
    return None


def bundle_root() -> str:
    """The bundle folder of the config being run: the parent of the ``configs/`` folder that holds it.

    Outside a bundle workflow (a config parsed with ``ConfigParser`` directly), the bundle the
    package ships (:func:`bundle_folder`). A config may still set ``bundle_root`` itself
    (``--bundle_root DIR``).
    """
    workflow = running_workflow()
    if workflow is not None:
        configs = Path(workflow.config_root_path)
        return os.fspath(configs.parent if configs.name == "configs" else configs)
    return os.fspath(bundle_folder())


#: the model settings (``train.json``'s ``model_settings``, a checkpoint's settings) the chains read
MODEL_KEYS = (
    "class_names",
    "pixel_spacing",
    "image_size",
    "in_channels",
    "slice_distance",
    "hu_window",
    "intensity_mean",
)


class Pipeline:
    """The transform chains of a bundle's ``pipeline.json``, built with the host config's settings.

    ``Pipeline(path, model=settings, body_only=False)["resample"]`` is the list of transforms under the
    id ``resample``; ``chain("load", "geometry")`` joins several. ``model`` is the one object that
    describes a trained network's input (``train.json``'s ``model_settings``; for evaluation and
    inference the settings stored in the checkpoint): its :data:`MODEL_KEYS` fill the ids the chains
    refer to (``@pixel_spacing``, ...). Further keyword settings (``series_uid``, ``body_only``...)
    override. Chains are built once, on first use, and shared.
    """

    def __init__(self, path: str | os.PathLike, model: Mapping | None = None, **settings) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: the bundle's pipeline definition is missing")
        self.path = os.fspath(path)
        globals_ = {"liver_fcn": "liver_fcn", "monai": "monai", "torch": "torch", "np": "numpy"}
        self.parser = ConfigParser(globals=globals_)
        self.parser.read_config(self.path)
        self.parser.update({key: model[key] for key in MODEL_KEYS if key in (model or {})})
        self.parser.update(settings)

    def __getitem__(self, name: str) -> list:
        if name not in self.parser:
            raise KeyError(f"{self.path} defines no chain {name!r}")
        return list(self.parser.get_parsed_content(name))

    def chain(self, *names: str) -> list:
        """The transforms of the named chains, in order."""
        return [t for name in names for t in self[name]]
