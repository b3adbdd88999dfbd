"""A run's summary and the comparison of an experiment's runs (table, CSV, Markdown, curves), from
the reads of :mod:`liver_fcn.runs`. The live run is :mod:`liver_fcn.tracking`'s."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from liver_fcn.distributed import is_rank0
from liver_fcn.errors import InputError
from liver_fcn.runs import (
    FOREGROUND,
    history,
    latest_run,
    run_curves,
    run_metrics,
    server_unreachable,
    tag_experiment,
    ui_link,
)
from liver_fcn.visualize import save_figure

__all__ = [
    "best_column",
    "compare_runs",
    "comparison_table",
    "log_comparison",
    "plot_curves",
    "print_run_summary",
    "run_curves",
    "run_metrics",
]

logger = logging.getLogger(__name__)


def print_run_summary(
    tracking_uri: str, experiment_name: str, run_name: str, keys: tuple[str, ...] = ("iou", "dice"), log=None
) -> dict:
    """Print the validation results of a run, where its store is and how to open ``mlflow ui``."""
    if not is_rank0():  # printed once, by the first process of a distributed run
        return {}
    log = log or logger.info
    import mlflow

    reason = server_unreachable(tracking_uri, timeout=5.0)
    if reason is not None:  # the run's end waits in its kept records (liver_fcn.offline)
        log(f"no summary of run {run_name!r}: MLflow tracking server {tracking_uri} unreachable ({reason})")
        return {}
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run = latest_run(client, experiment_name, run_name)
    if run is None:
        log(f"no MLflow run named {run_name!r} in experiment {experiment_name!r} at {tracking_uri}")
        return {}
    metrics = run_metrics(client, run.info.run_id)
    log(f"MLflow run {run.info.run_name} ({run.info.run_id}) in experiment {experiment_name!r}: {run.info.status}")
    for key in sorted(k for k in metrics if k.startswith("val_") and any(s in k for s in keys)):
        m = metrics[key]
        log(f"  {key:<20} best {m['best']:.4f} (iteration {m['best_step']})   last {m['last']:.4f}")
    log(f"  store: {tracking_uri}")
    if not tracking_uri.startswith(("http://", "https://")):
        log(f"  browse: mlflow ui --backend-store-uri {tracking_uri}")
    log(f"  runs:   {ui_link(tracking_uri, run.info.experiment_id)}")
    log(f"  run:    {ui_link(tracking_uri, run.info.experiment_id, run.info.run_id)}")
    return metrics


def best_column(metric: str, classes=FOREGROUND) -> str:
    """Row key holding a run's best value of ``metric`` (``val_iou_liver`` -> ``best_iou_liver``)."""
    for kind in ("iou", "dice"):
        for cls in classes:
            if metric == f"val_{kind}_{cls}":
                return f"best_{kind}_{cls}"
    return f"best_{metric}"


def log_comparison(tracking_uri: str, experiment: str, metric: str, rows: list[dict], folder: Path) -> tuple[str, str]:
    """Record a comparison as a run of its experiment (tag ``kind=comparison``): the table, CSV and
    curves as artifacts, the table as the run's description, each run's best ``metric`` as a metric
    ``<metric>.<run name>``. Returns the run id and its experiment id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    tag_experiment(client, exp.experiment_id)
    run = client.create_run(
        exp.experiment_id,
        run_name=f"compare-{metric}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={
            "kind": "comparison",
            "mlflow.note.content": f"{len(rows)} runs by best {metric}\n\n" + comparison_table(rows),
        },
    )
    rid = run.info.run_id
    client.log_param(rid, "metric", metric)
    client.log_param(rid, "runs", len(rows))
    key = best_column(metric)
    for r in rows:
        value = r.get(key, float("nan"))
        if not math.isnan(value):
            client.log_metric(rid, f"{metric}.{r['run']}", value)
    for f in ("comparison.md", "comparison.csv", "curves.png"):
        if (folder / f).is_file():
            client.log_artifact(rid, str(folder / f))
    client.set_terminated(rid)
    return rid, exp.experiment_id


def compare_runs(
    tracking_uri: str,
    experiment: str,
    metric: str = "val_iou_liver",
    classes: tuple[str, ...] = FOREGROUND,
) -> tuple[list[dict], dict]:
    """One row per training run of an experiment, best first by ``metric``; and each run's curves.

    A row holds the run name, status, variant, width, image size, lr, batch size, the best and last
    validation IoU and Dice of each class, the iterations validated and the wall time. Evaluation and
    comparison runs (tag ``kind``) are left out.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise InputError(f"{tracking_uri}: no experiment named {experiment!r}")
    rows, curves = [], {}
    for run in client.search_runs([exp.experiment_id], max_results=5000):
        if run.data.tags.get("kind") in ("evaluation", "comparison"):
            continue
        p, rid = run.data.params, run.info.run_id
        row = {
            "run": run.info.run_name,
            "run_id": rid,
            "status": run.info.status,
            "variant": p.get("variant", ""),
            "width": p.get("width", ""),
            "image_size": p.get("image_size", ""),
            "lr": p.get("lr", ""),
            "batch_size": p.get("batch_size", ""),
        }
        curves[run.info.run_name] = run_curves(client, rid, classes)
        iterations = 0
        for key, points in curves[run.info.run_name].items():
            values = [v for _, v in points]
            row[key.replace("val_", "best_", 1)] = max(values, default=float("nan"))
            row[key.replace("val_", "last_", 1)] = values[-1] if values else float("nan")
            iterations = max([iterations] + [step for step, _ in points])
        sort_key = best_column(metric, classes)
        if sort_key not in row:  # another metric of the run: its best value
            hist = history(client, rid, metric)
            pick = min if "loss" in metric else max
            row[sort_key] = pick((m.value for m in hist), default=float("nan"))
        row["iterations"] = iterations
        end = run.info.end_time or run.info.start_time
        row["wall_min"] = round((end - run.info.start_time) / 60000.0, 2) if run.info.start_time else float("nan")
        rows.append(row)
    sort_key = best_column(metric, classes)
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


def comparison_table(rows: list[dict], fmt: str = "markdown", classes=FOREGROUND) -> str:
    """The comparison rows as a Markdown table (``fmt="markdown"``) or aligned text (``"text"``)."""
    cols = ["run", "status", "variant", "width", "image_size", "lr", "batch_size"]
    for cls in classes:
        cols += [f"best_iou_{cls}", f"last_iou_{cls}", f"best_dice_{cls}", f"last_dice_{cls}"]
    cols += ["iterations", "wall_min"]
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


def plot_curves(curves: dict, out_png: str | os.PathLike, classes=FOREGROUND, title: str = "") -> Path:
    """Validation IoU (top row) and Dice (bottom row) per iteration, one panel per class, one line per run."""
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
            ax.set_title(f"validation {'IoU' if kind == 'iou' else 'Dice'} - {cls}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("iteration")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 3), 1, 0.96 if title else 1))

    return save_figure(fig, out_png)
