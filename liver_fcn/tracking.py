"""What a live bundle run records in MLflow: its name, provenance tags, parameters read from the
engine and the parsed config, its data sets, and the stored config. The handler that logs them is
:class:`liver_fcn.handlers.MLflowRunHandler`; reading stores and finished runs is
:mod:`liver_fcn.runs`; summaries, comparisons and curves :mod:`liver_fcn.reporting`.

``python -m monai.bundle run`` gives a config no handle on its own parsed content, so
:func:`export_bundle_config` finds the parser that is evaluating the expression and saves the
config as run (all files merged, command-line overrides applied), like MONAI's ``--tracking`` does.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import monai
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.handlers import ValidationHandler

import liver_fcn
from liver_fcn.bundle import Pipeline, running_parser
from liver_fcn.distributed import is_rank0
from liver_fcn.outputs import atomic_path
from liver_fcn.runs import (  # noqa: F401  (read here by configs and scripts as liver_fcn.tracking.*)
    EXPERIMENT_KIND,
    latest_run,
    resolve_tracking_uri,
    run_curves,
    run_id_of,
    sqlite_dir,
    tag_experiment,
    ui_link,
)
from liver_fcn.training import describe_augmentation

__all__ = [
    "EXPERIMENT_KIND",
    "dataset_input",
    "config_values",
    "datalist_dataset",
    "training_datasets",
    "training_params",
    "validation_patients",
    "describe_sampling",
    "describe_training_run",
    "latest_run",
    "run_id_of",
    "provenance_tags",
    "tag_experiment",
    "ui_link",
    "export_bundle_config",
    "make_run_name",
    "resolve_tracking_uri",
]

logger = logging.getLogger(__name__)


def make_run_name(settings: Mapping, stamp: str | None = None) -> str:
    """A readable, unique run name from the model settings: ``fcn8s-w0.25-256px-20261123-101500``."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    return f"fcn{settings['variant']}-w{float(settings['width']):g}-{settings['image_size']}px-{stamp}"


def provenance_tags(entry_point: str | None = None) -> dict[str, str]:
    """Where a run comes from: the command (MLflow's Source), the user (Created by), the git commit of
    the checkout liver-fcn runs from (when it is one) and the versions of liver-fcn, MONAI, PyTorch
    and Python."""
    argv = sys.argv[1:]
    command = entry_point or "python -m monai.bundle " + " ".join(argv)
    # MLflow's UI shows what follows the last "/" of the source: name it by the entry point and the
    # config files' names, and keep the whole command in its own tag
    words = [w for w in argv[:2] if not w.startswith("-")]
    configs = re.findall(r"([\w.-]+\.(?:json|ya?ml))", " ".join(argv))
    tags = {
        "mlflow.source.name": " ".join(["monai.bundle", *words]) + (f" ({' + '.join(configs)})" if configs else ""),
        "command": command[:5000],
        "mlflow.source.type": "LOCAL",
        "liver_fcn.version": liver_fcn.__version__,
        "monai.version": monai.__version__,
        "torch.version": torch.__version__,
        "python.version": platform.python_version(),
    }
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        pass
    here = Path(liver_fcn.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0 and commit.stdout.strip():
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=10,
            )
            tags["git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def datalist_dataset(datalist: str | os.PathLike, splits: Mapping[str, Sequence[Mapping]]):
    """:func:`dataset_input` of a ``liver-fcn prepare`` datalist, named by the name it records."""
    try:
        name = str(json.loads(Path(datalist).read_text()).get("name") or Path(datalist).parent.name)
    except (OSError, ValueError, AttributeError):
        name = Path(datalist).parent.name
    return dataset_input(name, splits)


def training_datasets(sets, validation: Sequence[Mapping]) -> list:
    """One MLflow dataset per training set of a :class:`~liver_fcn.data.TrainingSets`: the data set
    (its training and validation patients) first, then each extra set (its training volumes)."""
    (name, base), *extra = sets.records()
    return [dataset_input(name, {"training": base, "validation": validation})] + [
        dataset_input(n, {"training": entries}) for n, entries in extra
    ]


def validation_patients(engine: Engine) -> int:
    """The patients the training's validation handler scores (0 without one)."""
    for handlers in engine._event_handlers.values():
        for handler, *_ in handlers:
            owner = getattr(handler, "__self__", handler)
            if isinstance(owner, ValidationHandler) and owner.validator is not None:
                return len(owner.validator.data_loader.dataset)
    return 0


def training_params(engine: Engine) -> dict:
    """What a training run is, read from its engine: optimizer and its settings, budget, batch,
    loss, the augmentations of the data loader's transform, the data's size, device and precision."""
    optimizer, loader = engine.optimizer, engine.data_loader
    group = optimizer.param_groups[0]
    dataset = loader.dataset
    network = getattr(engine.network, "module", engine.network)  # DistributedDataParallel's replica
    params = {"optimizer": type(optimizer).__name__, "lr": group.get("initial_lr", group["lr"])}
    params.update({k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k in ("betas", "eps")})
    params.update(
        batch_size=loader.batch_size,
        iterations=engine.state.max_epochs * engine.state.epoch_length,
        epoch_length=engine.state.epoch_length,
        loss=str(engine.loss_function),
        augmentation=describe_augmentation(
            getattr(dataset, "transform", None), getattr(engine.prepare_batch, "augmentation", None)
        ),
        sampling=describe_sampling(loader.sampler),
        train_patients=len(getattr(dataset, "volumes", ())),
        train_slices=len(dataset),
        val_patients=validation_patients(engine),
        device=str(engine.state.device),
        precision="amp (fp16)" if getattr(engine, "amp", False) else getattr(network, "precision", "fp32"),
        torch=torch.__version__,
        monai=monai.__version__,
    )
    return params


def describe_sampling(sampler) -> str:
    """How a training loader draws its slices: ``shuffled`` or ``weighted`` (by the slices' sampling
    weights), ``in order``; under torchrun ``..., each of N processes its share``."""
    if isinstance(sampler, torch.utils.data.SequentialSampler) or getattr(sampler, "shuffle", True) is False:
        return "in order"
    text = "weighted" if hasattr(sampler, "weights") else "shuffled"
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        text += f", each of {sampler.num_replicas} processes its share"
    return text


def describe_training_run(client, run) -> str:
    """The run's description: what was trained on what, and its best validation score."""
    p, m = run.data.params, run.data.metrics
    text = (
        f"FCN-{p.get('variant', '?')}, width {p.get('width', '?')}, {p.get('pixel_spacing', '?')} mm pixels "
        f"({p.get('image_size', '?')} px), trained on {p.get('train_patients', '?')} patients "
        f"({p.get('train_slices', '?')} slices) for {p.get('iterations', '?')} iterations"
    )
    best = sorted(k for k in m if k.startswith("best_val_"))
    if "best_iteration" in m and best:
        key = "best_val_iou_liver" if "best_val_iou_liver" in m else best[0]
        text += (
            f"; best {key[len('best_') :]} {m[key]:.4f} on {p.get('val_patients', '?')} validation patient(s) "
            f"at iteration {int(m['best_iteration'])}, the checkpoint kept as model.pt"
        )
    else:
        text += "; no validation patient: model.pt is the last iteration's"
    return text + "."


def dataset_input(name: str, splits: Mapping[str, Sequence[Mapping]]):
    """The data a run saw as an MLflow dataset: patient ids and slice counts per split, and a digest of
    the patient ids, series UIDs, shapes and spacings - the same on every machine, whatever the local
    paths. Nothing from the DICOM headers but the (hashed) series UID."""
    from mlflow.entities import Dataset

    summary, slices, digest = {}, {}, hashlib.sha256()
    for split, entries in splits.items():
        ids = [str(e.get("patient", "")) for e in entries]
        summary[split] = ids
        slices[split] = int(sum(int((e.get("shape") or [0, 0, 0])[-1]) for e in entries))
        for e in sorted(entries, key=lambda e: str(e.get("patient", ""))):
            digest.update(
                json.dumps(
                    [
                        split,
                        e.get("patient"),
                        e.get("series_uid", ""),
                        e.get("shape"),
                        [round(float(v), 4) for v in (e.get("spacing") or [])],
                    ]
                ).encode()
            )
    return Dataset(
        name=name,
        digest=digest.hexdigest()[:16],
        source_type="liver-fcn-datalist",
        source=json.dumps({"name": name, "patients": summary}),
        profile=json.dumps({"patients": {k: len(v) for k, v in summary.items()}, "slices": slices}),
    )


def config_values(ids: Mapping[str, str]) -> dict:
    """``{name: value of config id}`` from the config being run (``python -m monai.bundle``)."""
    parser = running_parser()
    if parser is None:
        raise RuntimeError("config_params need a config evaluated by monai.bundle")
    values = {}
    for name, config_id in ids.items():
        value = parser.get_parsed_content(config_id)
        values[name] = value if value is None or isinstance(value, (bool, int, float, str, list)) else str(value)
    return values


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def export_bundle_config(path: str | os.PathLike) -> str:
    """Save the config being run as JSON; returns the path.

    The file holds the config with all files merged and command-line overrides applied, and under
    ``"_pipeline_"`` the shared chains of ``pipeline.json`` with the settings they were built with, under
    ``"_resolved_"`` the value every top-level setting took (``"$@bundle_root + '/models'"`` ->
    ``"bundle/models"``, the run name, ...), for those already evaluated and plain (numbers,
    strings, lists). Call it from a config expression, e.g.
    ``"$liver_fcn.tracking.export_bundle_config(@config_copy)"``, once the components are built.
    """
    if not is_rank0():  # one copy, from the first process of a distributed run
        return str(path)
    parser = running_parser()
    if parser is None:
        raise RuntimeError("export_bundle_config must be called from a config evaluated by monai.bundle")
    content = dict(parser.get())
    done = parser.ref_resolver.resolved_content
    resolved = {}
    for k, v in done.items():
        if "#" in k or k == "_meta_":
            continue
        if isinstance(v, torch.device):
            v = str(v)
        if _plain(v):
            resolved[k] = v
        elif isinstance(v, Pipeline):  # pipeline.json, with the settings it was built with
            content[f"_{k}_"] = dict(v.parser.get())
    content["_resolved_"] = resolved
    with atomic_path(path) as tmp:
        ConfigParser.export_config_file(content, str(tmp), fmt="json", indent=2)
    return str(path)
