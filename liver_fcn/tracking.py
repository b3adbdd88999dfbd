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

from liver_fcn.errors import root_cause
from liver_fcn.outputs import atomic_path

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
        tags: run tags set at start (``{"variant": "8s", ...}``); None values are left out, so
            ``"mlflow.parentRunId": null`` makes a top-level run and a run id a child run.
        kwargs: MLFlowHandler arguments (``tracking_uri``, ``experiment_name``, ``run_name``,
            ``experiment_param``, ``artifacts``, ``close_on_complete`` ...).
    """

    def __init__(self, tags: Mapping[str, object] | None = None, **kwargs) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or kwargs.get("tracking_uri") or ""
        folder = _sqlite_dir(uri)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        super().__init__(**kwargs)
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v is not None and str(v) not in ("", "None")}

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
        log(f"  {key:<20} best {m['best']:.4f} (iteration {m['best_step']})   last {m['last']:.4f}")
    ui = tracking_uri if not tracking_uri.startswith("http") else None
    log(f"  store: {tracking_uri}")
    if ui:
        log(f"  browse: mlflow ui --backend-store-uri {ui}   (then open http://127.0.0.1:5000)")
    return metrics


def _history(client, run_id: str, key: str) -> list:
    hist = [m for m in client.get_metric_history(run_id, key) if not math.isnan(m.value)]
    return sorted(hist, key=lambda m: (m.step, m.timestamp))


def _sort_key(metric: str, classes) -> str:
    """Row key holding a run's best value of ``metric`` (``val_iou_liver`` -> ``best_iou_liver``)."""
    for kind in ("iou", "dice"):
        for cls in classes:
            if metric == f"val_{kind}_{cls}":
                return f"best_{kind}_{cls}"
    return f"best_{metric}"


def compare_runs(
    tracking_uri: str,
    experiment: str,
    metric: str = "val_iou_liver",
    classes: tuple[str, ...] = ("liver", "bone", "kidney"),
) -> tuple[list[dict], dict]:
    """One row per training run of an experiment, best first by ``metric``; and each run's curves.

    A row holds the run name, status, variant, width, image size, lr, batch size, the best and last
    validation IoU and Dice of each class, the epochs run and the wall time. Evaluation runs
    (tag ``kind=evaluation``) are left out.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        from liver_fcn.errors import InputError

        raise InputError(f"{tracking_uri}: no experiment named {experiment!r}")
    rows, curves = [], {}
    for run in client.search_runs([exp.experiment_id], max_results=5000):
        if run.data.tags.get("kind") == "evaluation":
            continue
        p, rid = run.data.params, run.info.run_id
        row = {
            "run": run.info.run_name,
            "status": run.info.status,
            "variant": p.get("variant", ""),
            "width": p.get("width", ""),
            "image_size": p.get("image_size", ""),
            "lr": p.get("lr", ""),
            "batch_size": p.get("batch_size", ""),
        }
        curves[run.info.run_name] = {}
        epochs = 0
        for cls in classes:
            for kind in ("iou", "dice"):
                key = f"val_{kind}_{cls}"
                hist = _history(client, rid, key)
                curves[run.info.run_name][key] = [(m.step, m.value) for m in hist]
                row[f"best_{kind}_{cls}"] = max((m.value for m in hist), default=float("nan"))
                row[f"last_{kind}_{cls}"] = hist[-1].value if hist else float("nan")
                epochs = max([epochs] + [m.step for m in hist])
        sort_key = _sort_key(metric, classes)
        if sort_key not in row:  # another metric of the run: its best value
            hist = _history(client, rid, metric)
            pick = min if "loss" in metric else max
            row[sort_key] = pick((m.value for m in hist), default=float("nan"))
        row["epochs"] = epochs
        end = run.info.end_time or run.info.start_time
        row["wall_min"] = round((end - run.info.start_time) / 60000.0, 2) if run.info.start_time else float("nan")
        rows.append(row)
    sort_key = _sort_key(metric, classes)
    sign = 1.0 if "loss" in metric else -1.0  # best first: high scores, low losses

    def order(r):
        v = r.get(sort_key, float("nan"))
        return (math.isnan(v), sign * v if not math.isnan(v) else 0.0)

    rows.sort(key=order)
    return rows, curves


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def comparison_table(rows: list[dict], fmt: str = "markdown", classes=("liver", "bone", "kidney")) -> str:
    """The comparison rows as a Markdown table (``fmt="markdown"``) or aligned text (``"text"``)."""
    cols = ["run", "status", "variant", "width", "image_size", "lr", "batch_size"]
    for cls in classes:
        cols += [f"best_iou_{cls}", f"last_iou_{cls}", f"best_dice_{cls}", f"last_dice_{cls}"]
    cols += ["epochs", "wall_min"]
    header = [c.replace("_", " ") for c in cols]
    body = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(out) + "\n"


def plot_curves(curves: dict, out_png: str | os.PathLike, classes=("liver", "bone", "kidney"), title: str = "") -> Path:
    """Validation IoU (top row) and Dice (bottom row) per epoch, one panel per class, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(classes), figsize=(4.2 * len(classes), 6.4), sharex=True, squeeze=False)
    for i, kind in enumerate(("iou", "dice")):
        for j, cls in enumerate(classes):
            ax = axes[i][j]
            for run, series in curves.items():
                pts = series.get(f"val_{kind}_{cls}", [])
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=run)
            ax.set_title(f"validation {kind.upper() if kind == 'iou' else 'Dice'} - {cls}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("epoch")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 3), 1, 0.96 if title else 1))
    from liver_fcn.visualize import save_figure

    return save_figure(fig, out_png)
