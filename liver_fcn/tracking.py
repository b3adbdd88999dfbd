"""MLflow around a live bundle run: the run's handler and the stored config (reading stores and
finished runs is :mod:`liver_fcn.runs`; summaries, comparisons and curves :mod:`liver_fcn.reporting`).

MONAI's :class:`~monai.handlers.MLFlowHandler` logs parameters, per-iteration and per-epoch values
and artifacts, and closes the run as FINISHED on completion. :class:`MLflowRunHandler` adds what
a run needs to be trustworthy: a run that raises (an exception, Ctrl-C) is marked FAILED instead of
staying RUNNING; tags (variant, dataset...) are set at start; the store's folder is created.

``python -m monai.bundle run`` gives a config no handle on its own parsed content, so
:func:`export_bundle_config` finds the parser that is evaluating the expression and saves the
config as run (all files merged, command-line overrides applied), like MONAI's ``--tracking`` does.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.handlers import MLFlowHandler

from liver_fcn.bundle import Pipeline, running_parser
from liver_fcn.distributed import is_rank0
from liver_fcn.errors import root_cause
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

__all__ = [
    "EXPERIMENT_KIND",
    "MLflowRunHandler",
    "dataset_input",
    "config_values",
    "datalist_dataset",
    "training_datasets",
    "training_params",
    "validation_patients",
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
    import getpass
    import platform
    import re
    import subprocess
    import sys

    import monai
    import torch

    import liver_fcn

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
    from monai.handlers import ValidationHandler

    for handlers in engine._event_handlers.values():
        for handler, *_ in handlers:
            owner = getattr(handler, "__self__", handler)
            if isinstance(owner, ValidationHandler) and owner.validator is not None:
                return len(owner.validator.data_loader.dataset)
    return 0


def training_params(engine: Engine) -> dict:
    """What a training run is, read from its engine: optimizer and its settings, budget, batch,
    loss, the augmentations of the data loader's transform, the data's size, device and precision."""
    import monai

    from liver_fcn.training import describe_augmentation

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
        augmentation=describe_augmentation(getattr(dataset, "transform", None)),
        train_patients=len(getattr(dataset, "volumes", ())),
        train_slices=len(dataset),
        val_patients=validation_patients(engine),
        device=str(engine.state.device),
        precision="amp (fp16)" if getattr(engine, "amp", False) else getattr(network, "precision", "fp32"),
        torch=torch.__version__,
        monai=monai.__version__,
    )
    return params


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
    import hashlib

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


class MLflowRunHandler(MLFlowHandler):
    """MLFlowHandler that marks a crashed run FAILED and tags the run.

    Every experiment it creates or writes to is tagged as model training for MLflow 3's UI
    (:data:`EXPERIMENT_KIND`).

    Args:
        tags: run tags set at start (``{"variant": "8s", ...}``); None values are left out, so
            ``"mlflow.parentRunId": null`` makes a top-level run and a run id a child run.
        provenance: tag the run with its command, user, git commit and versions (:func:`provenance_tags`).
        dataset: an MLflow dataset (:func:`dataset_input`), or a list of them (the data set and each
            extra training set, :func:`training_datasets`), logged as the run's training inputs.
        log_file: a file the process's log also goes to while the engine runs; logged under ``logs/``.
        system_metrics: log CPU, memory (and GPU, where MLflow can read it) every 10 s.
        best_metrics: on a validation engine, log ``best_<metric>`` and ``best_iteration`` whenever
            the key metric improves (the best checkpoint is saved on the same event) and tag the run
            with the checkpoint it now holds.
        description: a callable ``(client, run) -> str`` for the run's description, set on completion.
        engine_params: on a trainer, also log what :func:`training_params` reads from the engine
            (optimizer, budget, batch, loss, augmentations, data size, device, precision).
        config_params: parameters read from the config being run, ``{"seed": "seed", "dataset":
            "datalist"}`` (parameter name: config id; objects are logged as their ``str``).
        curves: on completion, log the run's validation curves as ``plots/learning_curves.png``.
        plots: image files to log under ``plots/`` on completion (those that exist then).
        model_checkpoint: a checkpoint to log as the run's MLflow model when the engine completes
            (see :mod:`liver_fcn.registry`); None logs no model.
        registered_model_name: register that model as a new version of this name (None: log only).
        configs_dir: the bundle's ``configs/`` folder, whose configs the logged model carries
            (default: the source checkout's bundle).
        kwargs: MLFlowHandler arguments (``tracking_uri``, ``experiment_name``, ``run_name``,
            ``experiment_param``, ``artifacts``, ``close_on_complete`` ...).
    """

    def __init__(
        self,
        tags: Mapping[str, object] | None = None,
        model_checkpoint: str | os.PathLike | None = None,
        registered_model_name: str | None = None,
        provenance: bool = False,
        dataset=None,
        log_file: str | os.PathLike | None = None,
        system_metrics: bool = False,
        best_metrics: bool = False,
        description=None,
        curves: bool = False,
        plots: Sequence[str | os.PathLike] = (),
        configs_dir: str | os.PathLike | None = None,
        engine_params: bool = False,
        config_params: Mapping[str, str] | None = None,
        **kwargs,
    ) -> None:
        uri = kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
        folder = sqlite_dir(uri)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        super().__init__(**kwargs)
        self.uri = uri
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v is not None and str(v) not in ("", "None")}
        self.model_checkpoint = model_checkpoint
        self.configs_dir = configs_dir
        self.engine_params, self.config_params = bool(engine_params), dict(config_params or {})
        self.registered_model_name = (
            registered_model_name if registered_model_name not in ("", "None", "null") else None
        )
        self.provenance, self.dataset, self.log_file = bool(provenance), dataset, log_file
        self.system_metrics, self.best_metrics, self.description = bool(system_metrics), bool(best_metrics), description
        self.curves, self.plots = bool(curves), [p for p in plots if p]
        self._log_handler: logging.Handler | None = None
        self._monitor = None

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if not engine.has_event_handler(self.failed, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def start(self, engine: Engine) -> None:
        if self.engine_params or self.config_params:
            params = dict(self.experiment_param or {})
            if self.config_params:
                params.update(config_values(self.config_params))
            if self.engine_params:
                params.update(training_params(engine))
            if "pixel_spacing" in params and "image_size" in params:
                params["field_of_view"] = float(params["pixel_spacing"]) * int(params["image_size"])
            self.experiment_param = params
        super().start(engine)
        if self.cur_run is None:
            return
        run_id = self.cur_run.info.run_id
        tag_experiment(self.client, self.cur_run.info.experiment_id)
        tags = dict(self.tags)
        if self.provenance:
            tags.update(provenance_tags())
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        if self.dataset is not None and not self.client.get_run(run_id).inputs.dataset_inputs:
            from mlflow.entities import DatasetInput, InputTag

            datasets = self.dataset if isinstance(self.dataset, (list, tuple)) else [self.dataset]
            self.client.log_inputs(
                run_id, [DatasetInput(d, [InputTag("mlflow.data.context", "training")]) for d in datasets]
            )
        if self.log_file:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
            self._log_handler = logging.FileHandler(self.log_file)
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
            logging.getLogger().addHandler(self._log_handler)
        if self.system_metrics and self._monitor is None:
            self._monitor = _system_monitor(run_id, self.uri or self.client.tracking_uri)

    def epoch_completed(self, engine: Engine) -> None:
        super().epoch_completed(engine)
        state = engine.state
        if not (self.best_metrics and self.cur_run is not None and getattr(state, "key_metric_name", None)):
            return
        if state.best_metric_epoch != state.epoch:
            return
        step = int(self.global_epoch_transform(state.epoch))
        best = {
            f"best_{k}": float(v)
            for k, v in state.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        best["best_iteration"] = float(step)
        self._log_metrics(best, step=step)
        self.client.set_tag(
            self.cur_run.info.run_id,
            "best_checkpoint",
            f"model.pt = the validation at iteration {step}: {state.key_metric_name} {float(state.best_metric):.4f}",
        )

    def _log_params(self, params: dict) -> None:
        """Log parameters not yet in the run; a changed value (a resumed run with, say, more epochs)
        is recorded as a ``changed_param.<name>`` tag instead of failing as MLflow would."""
        if not self.cur_run:
            raise ValueError("Current Run is not Active to log params")
        existing = self.client.get_run(self.cur_run.info.run_id).data.params
        fresh = {}
        for k, v in params.items():
            value = str(v)
            if k not in existing:
                fresh[k] = value
            elif existing[k] != value[:6000]:
                self.client.set_tag(self.cur_run.info.run_id, f"changed_param.{k}", value[:5000])
        if fresh:
            super()._log_params(fresh)

    def complete(self) -> None:
        """Log the artifacts, then - with ``model_checkpoint`` - the checkpoint as the run's MLflow
        model, registered as a new version of ``registered_model_name`` when one is given."""
        self._stop_side_logging()
        if self.cur_run is not None and self.log_file and Path(self.log_file).is_file():
            self.client.log_artifact(self.cur_run.info.run_id, str(self.log_file), "logs")
        if self.cur_run is not None and self.curves:
            self._log_curves()
        for plot in self.plots if self.cur_run is not None else []:
            if Path(plot).is_file():
                self.client.log_artifact(self.cur_run.info.run_id, str(plot), "plots")
        if self.cur_run is not None and self.description is not None:
            run = self.client.get_run(self.cur_run.info.run_id)
            self.client.set_tag(run.info.run_id, "mlflow.note.content", self.description(self.client, run))
        super().complete()
        if self.cur_run is not None and self.model_checkpoint and Path(self.model_checkpoint).is_file():
            from liver_fcn.registry import log_model

            info = log_model(
                self.uri or self.client.tracking_uri,
                self.cur_run.info.run_id,
                self.model_checkpoint,
                self.registered_model_name,
                configs_dir=self.configs_dir,
            )
            version = getattr(info, "registered_model_version", None)
            if version is not None:
                logger.info(f"registered {self.model_checkpoint} as models:/{self.registered_model_name}/{version}")

    def _log_curves(self) -> None:
        """The run's validation curves as ``plots/learning_curves.png`` (when it validated at all)."""
        import tempfile

        from liver_fcn.reporting import plot_curves  # matplotlib: loaded when a run completes

        run_id = self.cur_run.info.run_id
        curves = run_curves(self.client, run_id)
        if not any(curves.values()):
            return
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_curves(
                {self.cur_run.info.run_name: curves},
                Path(tmp) / "learning_curves.png",
                title=f"{self.cur_run.info.run_name}: validation",
            )
            self.client.log_artifact(run_id, str(png), "plots")

    def _stop_side_logging(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            finally:
                self._monitor = None
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def failed(self, engine: Engine, e: BaseException) -> None:
        """Mark the run FAILED (with the error as a tag), then let the exception go on."""
        self._stop_side_logging()
        if self.cur_run is not None:
            run_id = self.cur_run.info.run_id
            root = root_cause(e)  # MONAI wraps what a transform raises: report the original cause
            message = f"{type(root).__name__}: {root}" + (f" (in {type(e).__name__}: {e})" if root is not e else "")
            try:
                self.client.set_tag(run_id, "error", message[:4000])
                self.client.set_terminated(run_id, "FAILED")
            finally:
                self.cur_run = None
                self._dispose_sqlite_store()
        raise e


def _system_monitor(run_id: str, tracking_uri: str):
    """MLflow's system-metrics monitor for ``run_id`` (CPU, memory, disk, network; GPU with pynvml),
    sampling every 10 s; None where psutil is missing."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    import importlib.util

    if importlib.util.find_spec("psutil") is None:  # what the monitor reads the machine with
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=1, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


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
