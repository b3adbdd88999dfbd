"""Leave-one-patient-out cross-validation of a bundle recipe, recorded in MLflow (``liver-fcn crossval``).

The bundle is run unchanged, as a user runs it: for each patient of a prepared data set, a fold
datalist holds every other patient for training and the held-out patient as its only test patient;
extra training sets (painted or warped CTs) join through the bundle's ``extra_training``, less the
volumes derived from the held-out patient. The fold has no validation
patient, so the held-out patient never chooses the checkpoint: training runs its fixed iteration
budget and keeps the last weights (``model.pt``). Then ``run evaluating`` scores the held-out
patient on its own grid, clean and after a simulated change of scanner.

MLflow gets one parent run (tag ``kind=crossval``) with a child run per fold training and per fold
evaluation (``mlflow.parentRunId``); the parent holds the per-fold scores
(``fold.<patient>.dice_liver``), their mean and standard deviation (``cv_mean_dice_liver``,
``cv_std_dice_liver``), and a CSV and Markdown table. :func:`compare_crossvals` sets two of them
side by side, fold by fold.
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from liver_fcn.data import load_datalist
from liver_fcn.data.ircadb import patient_ids
from liver_fcn.errors import InputError, Terminated
from liver_fcn.handlers import read_progress
from liver_fcn.options import show_progress
from liver_fcn.outputs import write_json_atomic, write_text_atomic
from liver_fcn.runs import resolve_tracking_uri, tag_experiment, ui_link

__all__ = ["SCORES", "compare_crossvals", "crossval", "fold_datalists", "summarise_folds"]

#: metrics carried from each fold's evaluation into the cross-validation record
SCORES = ("dice", "iou", "assd", "rvd")


def _all_patients(datalist: Path) -> list[dict]:
    data = json.loads(datalist.read_text())
    seen, out = set(), []
    for split in ("training", "validation", "test"):
        if not data.get(split):
            continue
        for e in load_datalist(datalist, split):
            if e["patient"] not in seen:
                seen.add(e["patient"])
                out.append(e)

    def natural(e: dict):
        m = re.search(r"(\d+)$", e["patient"])
        return (e["patient"][: m.start()] if m else e["patient"], int(m.group(1)) if m else -1)

    return sorted(out, key=natural)


def fold_datalists(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    patients: Sequence[str] = (),
) -> list[tuple[str, Path]]:
    """Write one datalist per held-out patient; returns ``[(patient, fold folder)]``.

    ``patients``: hold out only these (default: every patient). Extra training sets are not merged
    here: the fold's training run takes them as ``--extra_training``, and
    :class:`~liver_fcn.data.TrainingSets` leaves out any volume derived from the held-out patient.
    """
    datalist = (Path(dataset_dir) / "datalist.json").resolve()
    if not datalist.is_file():
        raise InputError(f"{datalist}: datalist not found; run `liver-fcn prepare` first")
    entries = _all_patients(datalist)
    if len(entries) < 2:
        raise InputError(f"{datalist}: cross-validation needs at least 2 patients, found {len(entries)}")
    names = [e["patient"] for e in entries]
    wanted = patient_ids(patients, names, f"in {datalist}")
    base = json.loads(datalist.read_text())
    folds = []
    for held in entries:
        if wanted and held["patient"] not in wanted:
            continue
        folder = Path(out_dir) / "folds" / re.sub(r"[^A-Za-z0-9._-]+", "_", held["patient"])
        fold = {
            "name": f"{base.get('name', 'dataset')} without {held['patient']}",
            "classes": base.get("classes"),
            "source": str(datalist.resolve()),
            "training": [e for e in entries if e is not held],
            "validation": [],
            "test": [held],
        }
        write_json_atomic(folder / "datalist.json", fold)
        folds.append((held["patient"], folder))
    return folds


def _read_rows(metrics_csv: Path, fold: str) -> list[dict]:
    rows = []
    with open(metrics_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r["patient"] != fold:
                continue
            row = {"fold": fold, "condition": r.get("condition") or "clean", "class": r["class"]}
            for m in SCORES:
                try:
                    row[m] = float(r[m])
                except (TypeError, ValueError):
                    row[m] = float("nan")
            rows.append(row)
    return rows


def summarise_folds(rows: list[dict]) -> tuple[dict[str, float], list[dict]]:
    """Per-fold MLflow metrics and the mean +- std table over folds, from the fold rows."""
    metrics: dict[str, float] = {}
    table = []
    for r in rows:
        tag = "" if r["condition"] == "clean" else f"{r['condition']}_"
        for m in SCORES:
            if not math.isnan(r[m]):
                metrics[f"fold.{r['fold']}.{tag}{m}_{r['class']}"] = r[m]
    keys = sorted({(r["condition"], r["class"]) for r in rows}, key=lambda k: (k[0] != "clean", k[0], k[1]))
    for condition, cls in keys:
        sel = [r for r in rows if r["condition"] == condition and r["class"] == cls]
        line = {"condition": condition, "class": cls}
        tag = "" if condition == "clean" else f"{condition}_"
        for m in SCORES:
            vals = np.array([r[m] for r in sel if not math.isnan(r[m])])
            line[f"{m}_mean"] = float(vals.mean()) if vals.size else float("nan")
            line[f"{m}_std"] = float(vals.std()) if vals.size else float("nan")
            line["n"] = int(vals.size) if m == "dice" else line.get("n", 0)
            if vals.size:
                metrics[f"cv_mean_{tag}{m}_{cls}"] = line[f"{m}_mean"]
                metrics[f"cv_std_{tag}{m}_{cls}"] = line[f"{m}_std"]
        table.append(line)
    return metrics, table


def _markdown(title: str, rows: list[dict], table: list[dict]) -> str:
    out = [f"# {title}", "", "Per fold (held-out patient), 3D on the patient's own grid:", ""]
    out.append("| fold | condition | class | Dice | IoU | ASSD (mm) | RVD (%) |")
    out.append("|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(
            f"| {r['fold']} | {r['condition']} | {r['class']} | {r['dice']:.4f} | {r['iou']:.4f} "
            f"| {r['assd']:.2f} | {r['rvd']:+.1f} |"
        )
    out += [
        "",
        "Mean +- std over folds:",
        "",
        "| condition | class | n | Dice | IoU | ASSD (mm) |",
        "|---|---|---|---|---|---|",
    ]
    for t in table:
        out.append(
            f"| {t['condition']} | {t['class']} | {t['n']} | {t['dice_mean']:.4f} +- {t['dice_std']:.4f} | "
            f"{t['iou_mean']:.4f} +- {t['iou_std']:.4f} | {t['assd_mean']:.2f} +- {t['assd_std']:.2f} |"
        )
    return "\n".join(out) + "\n"


def _stop_with_parent() -> None:
    """In a fold's process, before it runs: SIGTERM when the cross-validation process dies, even by
    SIGKILL (Linux ``PR_SET_PDEATHSIG``), so that no fold trains on orphaned with its run RUNNING."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _raise_on_sigterm(signum, frame) -> None:
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}", signum)


def _end_earlier_runs(client, experiment: str, name: str) -> int:
    """Mark the runs of an earlier cross-validation ``name`` that were left RUNNING (its process was
    killed) as KILLED; returns how many."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    parents = client.search_runs([exp.experiment_id], f"tags.crossval = '{name}' and tags.kind = 'crossval'")
    ended = 0
    for parent in parents:
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        for run in [*children, parent]:
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "error", "left RUNNING by a killed cross-validation; ended on re-run")
                client.set_terminated(run.info.run_id, "KILLED")
                ended += 1
    return ended


class FoldProgress:
    """Follows a fold training's :class:`~liver_fcn.handlers.ProgressFile`: on a terminal a bar of its
    iterations (``label`` as the description, the loss beside it); otherwise one plain log line an
    epoch (``[1/2] training without P: epoch 3/12, iteration 750/3000, loss 0.356, 9.1 min``)."""

    def __init__(self, path: Path, label: str, log: Callable[[str], None], progress: bool | str = "auto") -> None:
        self.path, self.label, self.log = path, label, log
        self.terminal = show_progress(progress)
        self.bar = None
        self.epoch = 0

    def update(self) -> None:
        p = read_progress(self.path)
        if not p or not p.get("max_iterations"):
            return
        if self.terminal:
            if self.bar is None:
                self.bar = tqdm(total=p["max_iterations"], desc=self.label, unit="it", file=sys.stderr)
            self.bar.n = p["iteration"]
            if p.get("loss") is not None:
                self.bar.set_postfix(loss=f"{p['loss']:.4f}", refresh=False)
            self.bar.refresh()
        elif (done := p["iteration"] * p["max_epochs"] // p["max_iterations"]) > self.epoch:  # an epoch more
            self.epoch = done
            loss = f", loss {p['loss']:.4f}" if p.get("loss") is not None else ""
            self.log(
                f"{self.label}: epoch {self.epoch}/{p['max_epochs']}, iteration {p['iteration']}/"
                f"{p['max_iterations']}{loss}, {p['elapsed_s'] / 60:.1f} min"
            )

    def close(self) -> None:
        self.update()
        if self.bar is not None:
            self.bar.close()


def _run(
    cmd: list[str], env: dict, log_path: Path, log: Callable[[str], None], follow: FoldProgress | None = None
) -> float:
    """Run one bundle command with its output in ``log_path``; ``follow`` shows its progress. If this
    process is interrupted, the command is stopped (SIGTERM: a training saves and marks its run)."""
    t0 = time.time()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f:
        proc = subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True, preexec_fn=_stop_with_parent
        )
        try:
            while True:
                try:
                    proc.wait(timeout=2.0)
                    break
                except subprocess.TimeoutExpired:
                    if follow is not None:
                        follow.update()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if follow is not None:
                follow.close()
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise InputError(f"{' '.join(cmd[3:5])} failed with exit status {proc.returncode}: {tail[0]} (log: {log_path})")
    return time.time() - t0


def crossval(
    dataset_dir: str | os.PathLike,
    configs: Sequence[str],
    name: str,
    out_dir: str | os.PathLike = "bundle/eval/crossval",
    overrides: Sequence[str] = (),
    extra_training: Sequence[str | os.PathLike] = (),
    extra_weights: Sequence[float] = (),
    patients: Sequence[str] = (),
    experiment: str = "liver-fcn-crossval",
    tracking_uri: str | None = None,
    scanner_shift: bool = True,
    log: Callable[[str], None] = print,
    progress: bool | str = "auto",
    overwrite: bool = False,
) -> dict[str, float]:
    """Run a leave-one-patient-out cross-validation; returns the parent run's metrics.

    ``configs``: the training config files (train.json first, then overrides such as cpu.json);
    evaluate.json is appended for the evaluations. ``overrides``: extra bundle arguments for the
    training runs (``["--iterations", "500"]``). ``progress``: a bar over each fold's iterations
    (``"auto"``: when stderr is a terminal; otherwise a log line an epoch). ``overwrite``: start a
    cross-validation of an existing name afresh (its folder is replaced; its runs stay in MLflow, those
    a killed process left RUNNING are marked KILLED).

    SIGTERM or Ctrl-C stops the running fold with SIGTERM (its training saves and marks its run) and
    marks the parent run KILLED; a fold's process also gets SIGTERM if this process is killed outright.
    """
    import mlflow

    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise InputError(f"{name!r}: a cross-validation name may hold letters, digits, '.', '_' and '-' only")
    for c in configs:
        if not Path(c).is_file():
            raise InputError(f"{c}: config file not found")
    out = Path(out_dir) / name
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: already exists; choose another --name, or pass --overwrite to start it afresh")

    if extra_weights and len(extra_weights) != len(extra_training):
        raise InputError(f"{len(extra_weights)} extra weights for {len(extra_training)} extra training sets")
    if any(not w > 0 for w in extra_weights):
        raise InputError(f"extra weights must be positive, got {list(extra_weights)}")
    extra: list = [str(Path(p).resolve()) for p in extra_training]
    for p in extra:  # a broken extra set fails here, before any fold trains
        load_datalist(Path(p) / "datalist.json" if Path(p).is_dir() else Path(p), "training")
    if extra_weights:
        extra = [{"datalist": p, "weight": float(w)} for p, w in zip(extra, extra_weights)]
    uri = resolve_tracking_uri(Path(out_dir).parent, tracking_uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    client = mlflow.MlflowClient(tracking_uri=uri)
    if overwrite and out.exists():
        ended = _end_earlier_runs(client, experiment, name)
        shutil.rmtree(out)
        log(
            f"{out}: earlier cross-validation removed"
            + (f", {ended} of its runs left RUNNING marked KILLED" if ended else "")
        )
    folds = fold_datalists(dataset_dir, out, patients)
    exp = client.get_experiment_by_name(experiment)
    # MLflow 3's UI shows this kind of experiment as "Machine learning"; which view a browser opens on
    # follows its GenAI / Model training toggle, hence the deep link printed at the end
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    tag_experiment(client, exp_id)
    parent = client.create_run(exp_id, run_name=f"cv-{name}", tags={"kind": "crossval", "crossval": name})
    pid = parent.info.run_id
    params = {
        "configs": json.dumps(list(configs)),
        "overrides": " ".join(overrides) or "none",
        "dataset": str(Path(dataset_dir).resolve()),
        "folds": len(folds),
        "held_out": ", ".join(p for p, _ in folds),
        "extra_training": ", ".join(str(p) for p in extra_training) or "none",
        "extra_weights": ", ".join(f"{w:g}" for w in extra_weights) or "as recorded",
        "checkpoint": "last (fixed budget, no validation patient)",
        "scanner_shift": scanner_shift,
    }
    for k, v in params.items():
        client.log_param(pid, k, str(v)[:6000])
    log(f"cross-validation {name!r}: {len(folds)} folds, MLflow parent run {pid} in {experiment!r} at {uri}")
    eval_configs = [*configs, str(Path(configs[0]).parent / "evaluate.json")]
    rows: list[dict] = []
    try:
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    except ValueError:  # not the main thread: SIGTERM keeps its handler
        previous = None
    try:
        for i, (patient, folder) in enumerate(folds, 1):
            tag = re.sub(r"[^A-Za-z0-9._-]+", "_", patient)
            common = [
                "--dataset_dir",
                str(folder),
                "--ckpt_dir",
                str(folder / "models"),
                "--output_dir",
                str(folder / "eval"),
                "--experiment_name",
                experiment,
                "--parent_run_id",
                repr(pid),
            ]
            train_cmd = [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "training",
                "--config_file",
                str(list(configs)),
                *common,
                "--run_name",
                f"cv-{name}-{tag}-train",
                "--registered_model_name",
                "None",
                "--progress_file",
                str(folder / "progress.json"),
                *(["--extra_training", repr(extra)] if extra else []),
                *overrides,
            ]
            label = f"[{i}/{len(folds)}] training without {patient}"
            log(f"{label} ...")
            follow = FoldProgress(folder / "progress.json", label, log, progress)
            train_s = _run(train_cmd, env, folder / "train.log", log, follow)
            eval_cmd = [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "evaluating",
                "--config_file",
                str(eval_configs),
                *common,
                "--eval_split",
                "test",
                "--eval_name",
                f"cv-{name}-{tag}-eval",
                "--scanner_shift",
                str(bool(scanner_shift)),
                "--phase_shift",
                str(bool(scanner_shift)),
            ]
            log(f"[{i}/{len(folds)}] evaluating {patient} ...")
            _run(eval_cmd, env, folder / "evaluate.log", log)
            fold_rows = _read_rows(folder / "eval" / "evaluation" / f"cv-{name}-{tag}-eval" / "metrics.csv", patient)
            rows += fold_rows
            client.log_metric(pid, f"fold.{patient}.train_minutes", train_s / 60.0)
            for r in fold_rows:
                if r["condition"] == "clean":
                    log(f"    {r['class']:<7} Dice {r['dice']:.4f}  IoU {r['iou']:.4f}  ASSD {r['assd']:.2f} mm")
        metrics, table = summarise_folds(rows)
        for k, v in metrics.items():
            client.log_metric(pid, k, v)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["fold", "condition", "class", *SCORES])
        w.writeheader()
        w.writerows(rows)
        write_text_atomic(out / "crossval.csv", buf.getvalue())
        write_text_atomic(out / "crossval.md", _markdown(f"Cross-validation {name}", rows, table))
        client.log_artifact(pid, str(out / "crossval.csv"))
        client.log_artifact(pid, str(out / "crossval.md"))
        summary = "; ".join(
            f"{t['class']} IoU {t['iou_mean']:.3f} +- {t['iou_std']:.3f}" for t in table if t["condition"] == "clean"
        )
        client.set_tag(
            pid,
            "mlflow.note.content",
            (
                f"Leave-one-patient-out cross-validation of {' + '.join(Path(c).name for c in configs)}"
                f"{' ' + ' '.join(overrides) if overrides else ''} "
                f"over {len(folds)} patients of {Path(dataset_dir).resolve()}"
                f"{' plus extra training volumes' if extra_training else ''}; last checkpoint of a fixed budget. "
                f"Mean over folds (3D): {summary}."
            ),
        )
        client.set_terminated(pid, "FINISHED")
    except BaseException as e:
        client.set_tag(pid, "error", f"{type(e).__name__}: {e}"[:4000])
        client.set_terminated(pid, "KILLED" if isinstance(e, Terminated | KeyboardInterrupt) else "FAILED")
        if isinstance(e, Terminated):
            raise Terminated(f"cross-validation {name!r} {e}; its runs are marked KILLED", signal.SIGTERM) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    log(f"cross-validation {name!r}, mean +- std over {len(folds)} folds (3D, each patient on its own grid):")
    for t in table:
        label = t["class"] if t["condition"] == "clean" else f"{t['class']} ({t['condition']})"
        log(
            f"  {label:<18} Dice {t['dice_mean']:.4f} +- {t['dice_std']:.4f}   "
            f"IoU {t['iou_mean']:.4f} +- {t['iou_std']:.4f}"
        )
    log(f"  table: {out / 'crossval.md'}")
    if not uri.startswith("http"):
        log(f"  browse: mlflow ui --backend-store-uri {uri}")
    log(f"  runs:   {ui_link(uri, exp_id)}")
    return metrics


def _crossval_run(client, experiment: str, name: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise InputError(f"no experiment named {experiment!r}")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.crossval = '{name}'", order_by=["attributes.start_time DESC"]
    )
    runs = [r for r in runs if r.data.tags.get("kind") == "crossval"]
    if not runs:
        raise InputError(f"experiment {experiment!r} has no cross-validation named {name!r}")
    if runs[0].info.status != "FINISHED":
        raise InputError(f"cross-validation {name!r} is {runs[0].info.status}, not FINISHED")
    return runs[0]


def compare_crossvals(
    tracking_uri: str, experiment: str, a: str, b: str, metrics: Sequence[str] = ("dice", "iou")
) -> tuple[list[dict], str]:
    """Fold-by-fold comparison of two cross-validations: rows and a Markdown table (B minus A)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    ra, rb = _crossval_run(client, experiment, a), _crossval_run(client, experiment, b)
    ma, mb = ra.data.metrics, rb.data.metrics
    # a fold's score or the mean over folds: "fold.<patient>.dice_liver", "cv_mean_dice_liver", each
    # with the evaluation condition before the score where there is one ("shifted_dice", "phase_dice")
    pat = re.compile(r"^(?:fold\.(?P<fold>.+)\.|cv_mean_)(?P<metric>(?:[a-z]+_)?(?P<score>[a-z]+))_(?P<cls>[a-z]+)$")
    found = [(k, pat.match(k)) for k in sorted(set(ma) & set(mb))]
    rows = [
        {
            "fold": m.group("fold") or "mean",
            "metric": m.group("metric"),
            "class": m.group("cls"),
            a: ma[k],
            b: mb[k],
            "difference": mb[k] - ma[k],
        }
        for k, m in sorted(found, key=lambda km: km[0].startswith("cv_mean_"))  # the folds first, then the mean
        if m and m.group("score") in metrics
    ]
    if not rows:
        raise InputError(f"cross-validations {a!r} and {b!r} share no fold metrics")
    lines = [f"| fold | metric | class | {a} | {b} | {b} - {a} |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['fold']} | {r['metric']} | {r['class']} | {r[a]:.4f} | {r[b]:.4f} | {r['difference']:+.4f} |"
        )
    return rows, "\n".join(lines) + "\n"
