"""Reads of MLflow stores and of finished runs, shared by the live run's handler
(:mod:`liver_fcn.tracking`) and the summaries and comparisons (:mod:`liver_fcn.reporting`)."""

from __future__ import annotations

import logging
import math
import os
import urllib.error
import urllib.request
from pathlib import Path

from liver_fcn import CLASS_NAMES
from liver_fcn.errors import InputError, reported

logger = logging.getLogger(__name__)

__all__ = [
    "EXPERIMENT_KIND",
    "FOREGROUND",
    "HTTP_RETRIES",
    "check_tracking_server",
    "history",
    "latest_run",
    "resolve_tracking_uri",
    "run_curves",
    "run_id_of",
    "run_metrics",
    "server_unreachable",
    "sqlite_dir",
    "tag_experiment",
    "ui_link",
]

#: the classes compared and plotted by default
FOREGROUND = CLASS_NAMES[1:]


def resolve_tracking_uri(output_dir: str | os.PathLike, uri: str | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``uri``, else SQLite at ``<output_dir>/mlruns.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if uri:
        return uri
    db = Path(output_dir).resolve() / "mlruns.db"
    return f"sqlite:///{db}"


def server_unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why the tracking server at ``uri`` (``http(s)://``) does not answer its ``/health``, or None when
    it answers (any HTTP answer counts, an auth error too) or ``uri`` is no server (SQLite, a folder)."""
    if not str(uri).startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{str(uri).rstrip('/')}/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:  # the server answered
        pass
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


@reported
def check_tracking_server(uri: str, fallback: str = "", timeout: float = 5.0) -> str:
    """The store a run records to: ``uri``, once a tracking server there answers.

    MLflow's client would retry for minutes and then fail with the run's files half made, so an
    unreachable server is one line before any work; or, given a ``fallback`` store (``sqlite:///...``),
    the run goes there and a warning says so. For a server, MLflow's HTTP retries are shortened to 2
    (backoff factor 1, 30 s timeout) unless ``MLFLOW_HTTP_REQUEST_*`` says otherwise: a server that
    goes away mid-run then costs seconds, not minutes, before the run records offline
    (:class:`liver_fcn.handlers.MLflowRunHandler`)."""
    reason = server_unreachable(uri, timeout)
    if reason is None:
        if str(uri).startswith(("http://", "https://")):
            for key, value in HTTP_RETRIES.items():
                os.environ.setdefault(key, value)
        return uri
    if fallback:
        logger.warning(f"MLflow tracking server {uri} unreachable ({reason}): this run is recorded in {fallback}")
        return check_tracking_server(fallback, timeout=timeout)
    raise InputError(
        f"{uri}: MLflow tracking server unreachable ({reason}); start it, record to a local store with "
        "--tracking_uri sqlite:///path/to/mlruns.db, or fall back to one with --tracking_fallback sqlite:///..."
    )


#: MLflow's HTTP retry settings for a run recording to a server (MLflow's defaults retry for about 4 minutes)
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def sqlite_dir(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    return None


#: the experiment tag MLflow 3's UI reads to open an experiment on its runs (model training), not on traces
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def tag_experiment(client, experiment_id: str) -> None:
    """Mark an experiment as model training for MLflow's UI (once; an existing kind is left alone)."""
    exp = client.get_experiment(experiment_id)
    for k, v in EXPERIMENT_KIND.items():
        if k not in (exp.tags or {}):
            client.set_experiment_tag(experiment_id, k, v)


def ui_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The address of an experiment's runs (or of one run) in MLflow's UI: the server itself for an
    ``http`` store, ``mlflow ui``'s default address otherwise."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}" + (
        f"/runs/{run_id}" if run_id else "/runs?workflowType=machine_learning"
    )


def latest_run(client, experiment_name: str, run_name: str | None, kinds_left_out: tuple[str, ...] = ()):
    """The newest run named ``run_name`` in an experiment (runs tagged with a ``kind`` in
    ``kinds_left_out`` left aside), or None."""
    exp = client.get_experiment_by_name(experiment_name) if run_name else None
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
    )
    runs = [r for r in runs if r.data.tags.get("kind") not in kinds_left_out]
    return runs[0] if runs else None


def run_id_of(tracking_uri: str, experiment_name: str, run_name: str | None) -> str | None:
    """The id of the newest training run named ``run_name`` (evaluation runs left aside), or None."""
    from mlflow import MlflowClient

    run = latest_run(MlflowClient(tracking_uri=tracking_uri), experiment_name, run_name, ("evaluation",))
    return run.info.run_id if run else None


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


def history(client, run_id: str, key: str) -> list:
    hist = [m for m in client.get_metric_history(run_id, key) if not math.isnan(m.value)]
    return sorted(hist, key=lambda m: (m.step, m.timestamp))


def run_curves(client, run_id: str, classes: tuple[str, ...] = FOREGROUND) -> dict[str, list[tuple[int, float]]]:
    """A run's validation IoU and Dice of each class: ``{"val_iou_liver": [(iteration, value), ...]}``."""
    return {
        f"val_{kind}_{cls}": [(m.step, m.value) for m in history(client, run_id, f"val_{kind}_{cls}")]
        for cls in classes
        for kind in ("iou", "dice")
    }
