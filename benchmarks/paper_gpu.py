"""The paper's configuration on a GPU: leave-one-patient-out training and evaluation, then inference speed.

For each patient of the datalist's ``training`` + ``validation`` splits, trains the bundle's
``train.json`` as shipped (full-width FCN-8s, 0.8 mm pixels, 512 x 512 field, batch 32, Adam 3e-4)
on the other patients for a fixed number of iterations with no validation patient (the last weights
are the model, as ``liver-fcn crossval`` does), and scores the held-out patient with
``evaluate.json`` (3D, on the patient's own grid: clean, scanner-shifted and another contrast phase).
The iteration count is ``--iterations`` or else fitted to ``--train-seconds`` from a short timed run
of the same configuration; ``--overrides`` adds extra training sets or other settings. Then it times
``python -m monai.bundle run inference`` on the held-out patients (one case, then several: the
difference is the time a volume takes once the process is up) in bf16 and fp32, and compares the two
masks. Configs are read and run through MONAI's ConfigParser; only the MLflow handlers are left out
(``--keep-mlflow`` keeps them), for machines without an MLflow install.

    python benchmarks/paper_gpu.py --dataset DIR [--train-seconds 360 | --iterations N] [--out OUT]
        [--overrides '{"extra_training": ["data/synth"]}']
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from mlflow_free import mlflow_free_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


def parser_for(files: list[str], overrides: dict, keep_mlflow: bool):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(CONFIGS / f) for f in files])
    for k, v in overrides.items():
        p[k] = v
    if not keep_mlflow:
        for k, v in mlflow_free_overrides(p).items():
            p[k] = v
    return p


def train(dataset: Path, datalist: Path, out: Path, iterations: int, args) -> float:
    overrides = {
        "dataset_dir": str(dataset),
        "datalist": str(datalist),
        "output_dir": str(out / "eval"),
        "ckpt_dir": str(out / "models"),
        "iterations": iterations,
        "epoch_length": iterations,
        "warmup_iterations": min(200, max(1, iterations // 10)),
        "num_workers": args.workers,
        "cache_workers": args.cache_workers,
        "run_name": out.name,
        "log_every": 25,
    }
    if args.batch:
        overrides["batch_size"] = args.batch
    overrides.update(json.loads(args.overrides))
    p = parser_for(["train.json"], overrides, args.keep_mlflow)
    t0 = time.perf_counter()
    p.get_parsed_content("initialize")  # seeds, schedule check, signal handling
    p.get_parsed_content("training")
    return time.perf_counter() - t0


def evaluate(dataset: Path, datalist: Path, out: Path, args) -> list[dict]:
    overrides = {
        "dataset_dir": str(dataset),
        "datalist": str(datalist),
        "output_dir": str(out / "eval"),
        "ckpt_dir": str(out / "models"),
        "eval_split": "test",
        "eval_name": "held-out",
        "scanner_shift": True,
    }
    p = parser_for(["train.json", "evaluate.json"], overrides, args.keep_mlflow)
    p.get_parsed_content("evaluating")
    import csv

    with open(out / "eval" / "evaluation" / "held-out" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def bundle_inference(inputs: list[dict], ckpt: Path, out: Path, precision: str) -> tuple[float, float, float]:
    """Wall, engine run and network seconds of one bundle inference command over ``inputs``."""
    out.mkdir(parents=True, exist_ok=True)
    datalist = out / "cases.json"
    datalist.write_text(json.dumps(inputs))
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "inference",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--input",
        str(datalist),
        "--checkpoint",
        str(ckpt),
        "--output_dir",
        str(out),
        "--precision",
        precision,
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-3000:])
    m = re.search(r"written to .* \(([\d.]+) s, network ([\d.]+) s", r.stdout)
    return wall, float(m.group(1)), float(m.group(2))


def dice(a: Path, b: Path) -> list[float]:
    import nibabel as nib
    import numpy as np

    x, y = np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(b)).dataobj)
    res = []
    for c in (1, 2, 3):
        s = int((x == c).sum() + (y == c).sum())
        res.append(1.0 if s == 0 else 2.0 * float(((x == c) & (y == c)).sum()) / s)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dataset", required=True, type=Path, help="folder with datalist.json (training + validation patients)"
    )
    ap.add_argument("--out", type=Path, default=Path("paper_gpu"))
    ap.add_argument("--train-seconds", type=float, default=360.0, help="training time for all folds together")
    ap.add_argument("--max-iterations", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: train.json's)")
    ap.add_argument("--iterations", type=int, default=0, help="iterations a fold (default: fitted to --train-seconds)")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--cache-workers", type=int, default=8, help="processes caching the training volumes")
    ap.add_argument("--overrides", default="{}", help="JSON of further train.json overrides")
    ap.add_argument(
        "--repeat", type=int, default=4, help="copies of each held-out CT in the timed inference run (0: no timing)"
    )
    ap.add_argument("--keep-mlflow", action="store_true")
    args = ap.parse_args()
    import torch

    dataset = args.dataset.resolve()
    args.out = args.out.resolve()
    dl = json.loads((dataset / "datalist.json").read_text())
    patients = dl.get("training", []) + dl.get("validation", [])
    print(
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; torch {torch.__version__}; "
        f"patients {[p['patient'] for p in patients]}",
        flush=True,
    )
    folds = []
    for held in patients:
        fold = {
            "training": [p for p in patients if p is not held],
            "validation": [],
            "test": [held],
            "classes": dl.get("classes"),
        }
        path = dataset / f"fold-{held['patient']}.json"
        path.write_text(json.dumps(fold))
        folds.append((held, path))

    iterations = args.iterations
    if not iterations:  # calibrate: a short run of the same configuration gives the time of one iteration
        probe = 30
        t_probe = train(dataset, folds[0][1], args.out / "probe", probe, args)
        t_probe2 = train(dataset, folds[0][1], args.out / "probe2", 2 * probe, args)
        per_it = max((t_probe2 - t_probe) / probe, 1e-3)
        fixed = max(t_probe - per_it * probe, 0.0)
        iterations = int(min(args.max_iterations, max(50, (args.train_seconds / len(folds) - fixed) / per_it)))
        print(
            f"calibration: {per_it:.3f} s an iteration, {fixed:.0f} s fixed per run -> {iterations} iterations a fold",
            flush=True,
        )

    rows = []
    for i, (held, path) in enumerate(folds):
        out = args.out / held["patient"]
        seconds = train(dataset, path, out, iterations, args)
        metrics = evaluate(dataset, path, out, args)
        print(f"fold {held['patient']}: trained {iterations} iterations in {seconds:.0f} s", flush=True)
        for m in metrics:
            print(
                f"  {m['condition']:<8} {m['class']:<7} Dice {float(m['dice']):.4f}  IoU {float(m['iou']):.4f}  "
                f"ASSD {float(m['assd']):.2f} mm  RVD {float(m['rvd']):+.1f} %",
                flush=True,
            )
        rows += metrics
        if i == 0 and args.repeat > 0:
            time_inference(dataset, patients, out / "models" / "model.pt", args)
    import statistics as st

    for cond in dict.fromkeys(r["condition"] for r in rows):
        for cls in ("liver", "bone", "kidney"):
            v = [float(r["iou"]) for r in rows if r["condition"] == cond and r["class"] == cls]
            d = [float(r["dice"]) for r in rows if r["condition"] == cond and r["class"] == cls]
            if v:
                print(
                    f"mean over {len(v)} folds {cond:<8} {cls:<7} IoU {st.mean(v):.4f} +- {st.pstdev(v):.4f}  "
                    f"Dice {st.mean(d):.4f}"
                )


def time_inference(dataset: Path, patients: list[dict], ckpt: Path, args) -> None:
    """Bundle inference on the GPU with one fold's model: seconds a volume, bf16 vs fp32 masks."""
    cases = [{"image": str(dataset / p["image"]), "patient": p["patient"]} for p in patients]
    many = [{"image": c["image"], "patient": f"{c['patient']}-{i}"} for i in range(args.repeat) for c in cases]
    for precision in ("bf16", "fp32"):
        w1, r1, n1 = bundle_inference(cases[:1], ckpt, args.out / f"infer-{precision}-1", precision)
        wn, rn, nn = bundle_inference(many, ckpt, args.out / f"infer-{precision}-n", precision)
        per = (rn - r1) / (len(many) - 1)
        print(
            f"inference {precision}: 1 case {w1:.1f} s wall ({r1:.1f} s run, network {n1:.2f} s); "
            f"{len(many)} cases {wn:.1f} s wall ({rn:.1f} s run, network {nn:.2f} s) -> "
            f"{per:.2f} s a volume after start-up, network {nn / len(many):.3f} s a volume",
            flush=True,
        )
    for c in cases:
        name = f"{c['patient']}-0"
        d = dice(args.out / "infer-bf16-n" / f"{name}_seg.nii.gz", args.out / "infer-fp32-n" / f"{name}_seg.nii.gz")
        print(
            f"bf16 vs fp32 masks, {c['patient']}: Dice liver {d[0]:.5f}, bone {d[1]:.5f}, kidney {d[2]:.5f}", flush=True
        )


if __name__ == "__main__":
    main()
