"""The checkpoint format: what a trained model file holds and every way of reading one.

A checkpoint is ``{"model": state_dict, "settings": {...}}`` (plain values, loads with
``weights_only=True``): the settings rebuild the network and its physical-space preprocessing
(:data:`REQUIRED_SETTINGS`), so inference needs nothing but the file. Training checkpoints add the
optimizer, the trainer's state and the MLflow run (:class:`RunIdentity`) so that a killed training
resumes into the same run (:func:`resume_state`).

Inference and evaluation take, as ``--checkpoint``:

* such a checkpoint (``model.pt``);
* a TorchScript file written by ``python -m monai.bundle ckpt_export`` - the network carries its
  settings as its ``settings`` attribute (JSON), which TorchScript saves with the module;
* an MLflow model URI, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``, from the tracking store
  of ``MLFLOW_TRACKING_URI`` (see :mod:`liver_fcn.registry`);
* a list of any of these: an ensemble (:class:`~liver_fcn.networks.Ensemble`, the members' class
  probabilities averaged), whose members must agree on the settings that define the input and the
  classes (:data:`ENSEMBLE_SETTINGS`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from liver_fcn import versions
from liver_fcn.errors import InputError, reported
from liver_fcn.networks import FCN, Ensemble

__all__ = [
    "ENSEMBLE_SETTINGS",
    "EPOCH_CKPT",
    "OPTIONAL_SETTINGS",
    "REQUIRED_SETTINGS",
    "ModelSettings",
    "RunIdentity",
    "checkpoint_settings",
    "is_torchscript",
    "model_identity",
    "latest_checkpoint",
    "load_model",
    "load_model_state",
    "download_checkpoint",
    "local_checkpoint",
    "network_from_settings",
    "resume_state",
]

#: required settings that define what the network takes in and the classes it scores
_INPUT_SETTINGS = ("in_channels", "class_names", "pixel_spacing", "image_size", "hu_window", "intensity_mean")
#: settings a checkpoint must carry: they rebuild the network and its preprocessing
REQUIRED_SETTINGS = ("variant", "width", *_INPUT_SETTINGS)
#: settings with a default when a checkpoint leaves them out
OPTIONAL_SETTINGS: dict = {"padding": "aligned", "slice_distance": None}
#: settings every member of an ensemble must share: they define its input and its output classes
ENSEMBLE_SETTINGS = (*_INPUT_SETTINGS, "slice_distance")
#: per-period training checkpoints, ``<run>_checkpoint_epoch=N.pt``
EPOCH_CKPT = re.compile(r"^(?P<run>.+)_checkpoint_epoch=(?P<epoch>\d+)\.pt$")


class ModelSettings:
    """What inference must know about a trained network, saved beside its weights.

    Used as ``CheckpointSaver(save_dict={"model": net, "settings": ModelSettings(settings, run_name=...)})``,
    so the checkpoint is ``{"model": state_dict, "settings": {...}}``. ``train.json`` defines the
    settings once (``model_settings``); the checkpoint, the resume check and the MLflow parameters all
    take that one dict.
    """

    def __init__(self, settings: Mapping | None = None, **more) -> None:
        merged = {**dict(settings or {}), **more}
        self.settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in merged.items()}

    def state_dict(self) -> dict:
        return dict(self.settings)

    def load_state_dict(self, state: Mapping) -> None:
        self.settings = dict(state)


class RunIdentity:
    """The MLflow run a training belongs to, saved in its checkpoints (plain values)."""

    def __init__(self, run_name: str, experiment_name: str) -> None:
        self.run_name, self.experiment_name = run_name, experiment_name

    def state_dict(self) -> dict:
        return {"run_name": self.run_name, "experiment_name": self.experiment_name}

    def load_state_dict(self, state: dict) -> None:
        self.run_name, self.experiment_name = state["run_name"], state["experiment_name"]


def _members(checkpoint) -> list | None:
    """The members of an ensemble checkpoint (a list or tuple), None for a single one."""
    if not isinstance(checkpoint, (list, tuple)):
        return None
    if not checkpoint:
        raise InputError("checkpoint: an ensemble needs at least one checkpoint, got an empty list")
    return list(checkpoint)


def local_checkpoint(checkpoint, tracking_uri: str | None = None) -> Path | list[Path]:
    """The local file of ``checkpoint``: the path itself, or the checkpoint of an MLflow model URI
    (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) in the registry of ``tracking_uri`` (default
    ``MLFLOW_TRACKING_URI``), downloaded once per process. For an ensemble (a list), the list of
    its members' files."""
    members = _members(checkpoint)
    if members is not None:
        return [local_checkpoint(m, tracking_uri) for m in members]
    text = str(checkpoint)
    if text.startswith("models:/"):
        return download_checkpoint(text, tracking_uri)
    return Path(checkpoint)


#: MLflow model URI -> downloaded checkpoint, once per process
_downloaded: dict[str, Path] = {}


@reported
def download_checkpoint(uri: str, tracking_uri: str | None = None) -> Path:
    """The checkpoint of the MLflow model ``uri`` (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``),
    downloaded once per process from the registry of ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``)."""
    key = f"{tracking_uri or os.environ.get('MLFLOW_TRACKING_URI', '')}|{uri}"
    if key in _downloaded:
        return _downloaded[key]
    import mlflow  # here: only a models:/ URI needs MLflow, and it is slow to import

    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri,
            dst_path=tempfile.mkdtemp(prefix="liver-fcn-model-"),
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
        )
    except Exception as e:
        where = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        raise InputError(
            f"{uri}: not found in the model registry at {where} ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        ) from None
    found = sorted(Path(local).glob("artifacts/*.pt"))
    if len(found) != 1:
        raise InputError(f"{uri}: the registered model holds no liver-fcn checkpoint (artifacts/*.pt)")
    _downloaded[key] = found[0]
    return found[0]


def network_from_settings(settings: Mapping) -> torch.nn.Module:
    """The network a checkpoint's settings describe (untrained: load its weights with :func:`load_model`)."""
    return FCN(
        settings["variant"],
        int(settings["in_channels"]),
        len(settings["class_names"]),
        float(settings["width"]),
        settings.get("padding") or "aligned",
        settings=settings,
    )


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``) rather than a ``torch.save`` file."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_torchscript(path: Path, device="cpu") -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception as e:
        raise InputError(f"{path}: cannot be read as a TorchScript model ({type(e).__name__}: {e})") from None


def load_model_state(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, settings) of a model checkpoint: ``{"model": ..., "settings": ...}``, a bare
    state dict (no settings), a TorchScript export or an MLflow model URI."""
    path = local_checkpoint(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found; train first or give another checkpoint")
    if is_torchscript(path):
        module = _load_torchscript(path)
        return dict(module.state_dict()), _script_settings(module, path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"], dict(ckpt.get("settings") or {})
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, {}
    raise InputError(f"{path}: not a model checkpoint (expected a state dict or {{'model': state_dict}})")


def _script_settings(module, path: Path) -> dict:
    text = getattr(module, "settings", "") or ""
    try:
        return dict(json.loads(text)) if text else {}
    except (ValueError, TypeError):
        raise InputError(f"{path}: the exported network's settings are not valid JSON") from None


@reported
def checkpoint_settings(checkpoint, overrides: Mapping | None = None) -> dict:
    """Settings stored in a checkpoint (with :data:`OPTIONAL_SETTINGS` filled in), under ``overrides``
    (their not-None values).

    For an ensemble (a list of checkpoints): the first member's settings plus ``ensemble``, the
    list of every member's settings; a member that differs from the first in one of
    :data:`ENSEMBLE_SETTINGS` is refused, named with the setting.

    A checkpoint without the settings that define the network and its physical-space preprocessing
    (:data:`REQUIRED_SETTINGS`) - a bare state dict, or one written before pixel spacing was recorded -
    is refused with one line rather than run with guessed preprocessing.
    """
    members = _members(checkpoint)
    if members is not None:
        each = [checkpoint_settings(m, overrides) for m in members]
        for member, other in zip(members[1:], each[1:]):
            differ = [k for k in ENSEMBLE_SETTINGS if other.get(k) != each[0].get(k)]
            if differ:
                raise InputError(
                    f"{member}: cannot join an ensemble with {members[0]}: they differ in {', '.join(differ)}"
                )
        return {**each[0], "ensemble": each}
    _, stored = load_model_state(checkpoint)
    settings = dict(OPTIONAL_SETTINGS)
    settings.update(stored)
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    missing = [k for k in REQUIRED_SETTINGS if settings.get(k) is None]
    if missing:
        what = "holds no settings" if not stored else f"lacks the settings {', '.join(missing)}"
        raise InputError(
            f"{checkpoint}: checkpoint {what}, so its preprocessing cannot be reproduced "
            "(written by an older liver-fcn?); train it again with this version"
        )
    return settings


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(checkpoint, model_file, settings: Mapping) -> dict:
    """Which model made a mask: the checkpoint as the user named it (a path or ``models:/NAME@ALIAS``),
    the SHA-256 of its local file, the package and bundle versions, and the model settings. For an
    ensemble, the lists of its members' names and digests."""
    members = _members(checkpoint)
    return {
        "checkpoint": [str(m) for m in members] if members is not None else str(checkpoint),
        "sha256": [_sha256(f) for f in model_file] if members is not None else _sha256(model_file),
        **{f"{name}_version": version for name, version in versions().items()},
        "settings": {k: settings[k] for k in sorted(settings)},
    }


@reported
def load_model(checkpoint, network: torch.nn.Module, device="cpu") -> torch.nn.Module:
    """The network to run: ``network`` (built from the checkpoint's settings) with the checkpoint's
    weights, or - for a TorchScript export - the exported module itself. On ``device``, in eval mode.

    For an ensemble (a list of checkpoints), an :class:`~liver_fcn.networks.Ensemble`: ``network``
    takes the first member's weights, each further member is built from its own settings."""
    members = _members(checkpoint)
    if members is not None:
        nets = [load_model(members[0], network, device)]
        nets += [load_model(m, network_from_settings(checkpoint_settings(m)), device) for m in members[1:]]
        return Ensemble(nets).to(device).eval()
    path = local_checkpoint(checkpoint)
    if path.is_file() and is_torchscript(path):
        return _load_torchscript(path, device).eval()
    state, _ = load_model_state(path)
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise InputError(
            f"{path}: weights do not fit the network its settings describe ({first[0] if first else e})"
        ) from None
    return network.to(device).eval()


def latest_checkpoint(ckpt_dir: str | os.PathLike, run_name: str | None = None) -> Path | None:
    """The newest per-epoch training checkpoint (``<run>_checkpoint_epoch=N.pt``) in ``ckpt_dir``.

    With ``run_name``, the newest of that run. None when there is none.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = [
        (p.stat().st_mtime, int(m.group("epoch")), p)
        for p in folder.iterdir()
        if (m := EPOCH_CKPT.match(p.name)) and (run_name is None or m.group("run") == run_name)
    ]
    return max(found)[2] if found else None


@reported
def resume_state(ckpt_dir: str | os.PathLike, resume: bool | str, settings: dict | None = None) -> dict:
    """What to resume from: ``{"checkpoint": path or None, "run_name": ..., "epoch": ...}``.

    ``resume``: False (a new run), True (the newest training checkpoint in ``ckpt_dir``) or a run
    name (that run's newest checkpoint). No checkpoint to resume from is an error; so is one written
    by a network of other settings (variant, width ...), named in the message.
    """
    if resume is False or resume is None or str(resume).lower() in ("false", "0", "no", ""):
        return {"checkpoint": None, "run_name": None, "epoch": 0}
    run_name = None if resume is True or str(resume).lower() in ("true", "1", "yes") else str(resume)
    path = latest_checkpoint(ckpt_dir, run_name)
    if path is None:
        what = f"of run {run_name} " if run_name else ""
        raise InputError(f"{ckpt_dir}: no training checkpoint {what}(<run>_checkpoint_epoch=N.pt) to resume from")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = ckpt.get("settings", {})
    for key, value in (settings or {}).items():
        if key in saved and saved[key] != value and key not in ("run_name", "experiment_name"):
            raise InputError(f"{path}: trained with {key}={saved[key]!r}, this run has {key}={value!r}")
    run = ckpt.get("run", {})
    trainer = ckpt.get("trainer", {})  # ignite's state: iteration, epoch_length, max_epochs
    epoch = int(trainer.get("iteration", 0)) // max(1, int(trainer.get("epoch_length") or 1))
    return {"checkpoint": str(path), "run_name": run.get("run_name"), "epoch": epoch}
