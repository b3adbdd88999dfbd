"""MLflow around the bundle: the run's handler, the stored config, summaries of finished runs.

MONAI's :class:`~monai.handlers.MLFlowHandler` logs parameters, per-iteration and per-epoch values
and artifacts, and closes the run as FINISHED on completion. :class:`MLflowRunHandler` adds what
a run needs to be trustworthy: a run that raises (an exception, Ctrl-C) is marked FAILED instead of
staying RUNNING; tags (variant, dataset...) are set at start; the store's folder is created.

``python -m monai.bundle run`` gives a config no handle on its own parsed content, so
:func:`export_bundle_config` finds the parser that is evaluating the expression and saves the
config as run (all files merged, command-line overrides applied), like MONAI's ``--tracking`` does.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.handlers import MLFlowHandler

__all__ = [
    "MLflowRunHandler",
    "export_bundle_config",
    "make_run_name",
    "print_run_summary",
    "resolve_tracking_uri",
    "run_metrics",
]


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
        tags: run tags set at start (``{"variant": "8s", ...}``).
        kwargs: MLFlowHandler arguments (``tracking_uri``, ``experiment_name``, ``run_name``,
            ``experiment_param``, ``artifacts``, ``close_on_complete`` ...).
    """

    def __init__(self, tags: Mapping[str, object] | None = None, **kwargs) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or kwargs.get("tracking_uri") or ""
        folder = _sqlite_dir(uri)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        super().__init__(**kwargs)
        self.tags = {k: str(v) for k, v in (tags or {}).items()}

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if not engine.has_event_handler(self.failed, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def start(self, engine: Engine) -> None:
        super().start(engine)
        if self.cur_run is not None:
            for k, v in self.tags.items():
                self.client.set_tag(self.cur_run.info.run_id, k, v)

    def failed(self, engine: Engine, e: BaseException) -> None:
        """Mark the run FAILED (with the error as a tag), then let the exception go on."""
        if self.cur_run is not None:
            run_id = self.cur_run.info.run_id
            try:
                self.client.set_tag(run_id, "error", f"{type(e).__name__}: {e}"[:4000])
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ConfigParser.export_config_file(content, str(tmp), fmt="json", indent=2)
    os.replace(tmp, path)
    return str(path)


def run_metrics(client, run_id: str) -> dict[str, dict[str, float]]:
    """For each metric of a run: its last value, best (max, or min for losses) and the best's step."""
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        hist = [m for m in client.get_metric_history(run_id, key) if not math.isnan(m.value)]
        if not hist:
            out[key] = {"last": float("nan"), "best": float("nan"), "best_step": -1}
            continue
        hist.sort(key=lambda m: (m.step, m.timestamp))
        pick = min if "loss" in key else max
        best = pick(hist, key=lambda m: m.value)
        out[key] = {"last": hist[-1].value, "best": best.value, "best_step": best.step}
    return out


def print_run_summary(
    tracking_uri: str, experiment_name: str, run_name: str, keys: tuple[str, ...] = ("iou", "dice"), log=print
) -> dict:
    """Print the validation results of a run, where its store is and how to open ``mlflow ui``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'", order_by=["attributes.start_time DESC"]
    ) if exp else []
    if not runs:
        log(f"no MLflow run named {run_name!r} in experiment {experiment_name!r} at {tracking_uri}")
        return {}
    run = runs[0]
    metrics = run_metrics(client, run.info.run_id)
    log(f"MLflow run {run.info.run_name} ({run.info.run_id}) in experiment {experiment_name!r}: {run.info.status}")
    for key in sorted(k for k in metrics if k.startswith("val_") and any(s in k for s in keys)):
        m = metrics[key]
        log(f"  {key:<20} best {m['best']:.4f} (epoch {m['best_step']})   last {m['last']:.4f}")
    ui = tracking_uri if not tracking_uri.startswith("http") else None
    log(f"  store: {tracking_uri}")
    if ui:
        log(f"  browse: mlflow ui --backend-store-uri {ui}   (then open http://127.0.0.1:5000)")
    return metrics
