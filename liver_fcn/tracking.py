"""MLflow around a live bundle run: the run's handler and the stored config (reading finished runs
back - summaries, comparisons, curves - is :mod:`liver_fcn.reporting`).

MONAI's :class:`~monai.handlers.MLFlowHandler` logs parameters, per-iteration and per-epoch values
and artifacts, and closes the run as FINISHED on completion. :class:`MLflowRunHandler` adds what
a run needs to be trustworthy: a run that raises (an exception, Ctrl-C) is marked FAILED instead of
staying RUNNING; tags (variant, dataset...) are set at start; the store's folder is created.

``python -m monai.bundle run`` gives a config no handle on its own parsed content, so
:func:`export_bundle_config` finds the parser that is evaluating the expression and saves the
config as run (all files merged, command-line overrides applied), like MONAI's ``--tracking`` does.
"""

from __future__ import annotations

import logging
import inspect
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.handlers import MLFlowHandler

from liver_fcn.errors import root_cause
from liver_fcn.outputs import atomic_path

__all__ = [
    "MLflowRunHandler",
    "export_bundle_config",
    "make_run_name",
    "resolve_tracking_uri",
]

logger = logging.getLogger(__name__)


def resolve_tracking_uri(output_dir: str | os.PathLike, uri: str | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``uri``, else SQLite at ``<output_dir>/mlruns.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if uri:
        return uri
    db = Path(output_dir).resolve() / "mlruns.db"
    return f"sqlite:///{db}"


def make_run_name(variant: str, width: float, image_size: int, stamp: str | None = None) -> str:
    """A readable, unique run name: ``fcn8s-w0.25-256px-20261123-101500``."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    return f"fcn{variant}-w{width:g}-{image_size}px-{stamp}"


def _sqlite_dir(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    return None


class MLflowRunHandler(MLFlowHandler):
    """MLFlowHandler that marks a crashed run FAILED and tags the run.

    Args:
        tags: run tags set at start (``{"variant": "8s", ...}``); None values are left out, so
            ``"mlflow.parentRunId": null`` makes a top-level run and a run id a child run.
        model_checkpoint: a checkpoint to log as the run's MLflow model when the engine completes
            (see :mod:`liver_fcn.registry`); None logs no model.
        registered_model_name: register that model as a new version of this name (None: log only).
        kwargs: MLFlowHandler arguments (``tracking_uri``, ``experiment_name``, ``run_name``,
            ``experiment_param``, ``artifacts``, ``close_on_complete`` ...).
    """

    def __init__(
        self,
        tags: Mapping[str, object] | None = None,
        model_checkpoint: str | os.PathLike | None = None,
        registered_model_name: str | None = None,
        **kwargs,
    ) -> None:
        uri = kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
        folder = _sqlite_dir(uri)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        super().__init__(**kwargs)
        self.uri = uri
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v is not None and str(v) not in ("", "None")}
        self.model_checkpoint = model_checkpoint
        self.registered_model_name = registered_model_name if registered_model_name not in ("", "None", "null") else None

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if not engine.has_event_handler(self.failed, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def start(self, engine: Engine) -> None:
        super().start(engine)
        if self.cur_run is not None:
            for k, v in self.tags.items():
                self.client.set_tag(self.cur_run.info.run_id, k, v)

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
        super().complete()
        if self.cur_run is not None and self.model_checkpoint and Path(self.model_checkpoint).is_file():
            from liver_fcn.registry import log_model

            info = log_model(self.uri or self.client.tracking_uri, self.cur_run.info.run_id, self.model_checkpoint,
                             self.registered_model_name)
            version = getattr(info, "registered_model_version", None)
            if version is not None:
                logger.info(f"registered {self.model_checkpoint} as models:/{self.registered_model_name}/{version}")

    def failed(self, engine: Engine, e: BaseException) -> None:
        """Mark the run FAILED (with the error as a tag), then let the exception go on."""
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


def _find_bundle_parser() -> ConfigParser | None:
    for frame_info in inspect.stack()[1:]:
        for value in frame_info.frame.f_locals.values():
            if isinstance(value, ConfigParser):
                return value
            parser = getattr(value, "parser", None)
            if isinstance(parser, ConfigParser):
                return parser
    return None


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
    ``"_resolved_"`` the value every top-level setting took (``"$@bundle_root + '/models'"`` ->
    ``"bundle/models"``, the run name, ...), for those already evaluated and plain (numbers,
    strings, lists). Call it from a config expression, e.g.
    ``"$liver_fcn.tracking.export_bundle_config(@config_copy)"``, once the components are built.
    """
    parser = _find_bundle_parser()
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
    content["_resolved_"] = resolved
    with atomic_path(path) as tmp:
        ConfigParser.export_config_file(content, str(tmp), fmt="json", indent=2)
    return str(path)
