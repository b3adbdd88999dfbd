"""``liver-fcn`` command line: phantom data, 3D-IRCADb-01 preparation, run summaries and comparisons.

Training, evaluation and inference are MONAI bundle commands (``python -m monai.bundle run ...``);
this tool covers what comes before and after them.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from liver_fcn.errors import InputError
from liver_fcn.outputs import write_text_atomic


def _phantom(args: argparse.Namespace) -> int:
    from liver_fcn.data.phantom import write_phantoms

    t0 = time.time()
    paths = write_phantoms(
        args.out, args.patients, seed=args.seed, size=args.size, slices=args.slices, rescale_intercept=args.intercept
    )
    for p in paths:
        print(f"wrote {p}")
    print(f"{len(paths)} phantom patients in {time.time() - t0:.1f} s")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from liver_fcn.data.ircadb import prepare

    prepare(
        args.ircadb,
        args.out,
        mapping=args.mapping,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        val_patients=args.val_patients,
        test_patients=args.test_patients,
        overwrite=args.overwrite,
    )
    return 0


def _summary(args: argparse.Namespace) -> int:
    import mlflow

    from liver_fcn.tracking import print_run_summary, resolve_tracking_uri

    uri = resolve_tracking_uri(args.output_dir, args.tracking_uri)
    run_name = args.run_name
    if run_name is None:
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(args.experiment)
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1) if exp else []
        if not runs:
            raise InputError(f"{uri}: no runs in experiment {args.experiment!r}")
        run_name = runs[0].info.run_name
    return 0 if print_run_summary(uri, args.experiment, run_name) else 1


def _compare(args: argparse.Namespace) -> int:
    import csv
    import io
    from pathlib import Path

    from liver_fcn.tracking import compare_runs, comparison_table, plot_curves, resolve_tracking_uri

    uri = resolve_tracking_uri(args.output_dir, args.tracking_uri)
    rows, curves = compare_runs(uri, args.experiment, metric=args.metric)
    if not rows:
        raise InputError(f"{uri}: experiment {args.experiment!r} has no training runs")
    print(f"{len(rows)} runs of experiment {args.experiment!r} at {uri}, best {args.metric} first:")
    print(comparison_table(rows, fmt="text"))
    out = Path(args.out or Path(args.output_dir) / "compare" / args.experiment)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "comparison.md", f"# {args.experiment}: runs by {args.metric}\n\n" + comparison_table(rows))
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "comparison.csv", buf.getvalue())
    plot_curves(curves, out / "curves.png", title=f"{args.experiment}: validation curves")
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'curves.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="liver-fcn", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantom", help="write synthetic abdominal CT patients in the 3D-IRCADb-01 layout")
    ph.add_argument("--out", required=True, help="output folder (3Dircadb1.N folders are created in it)")
    ph.add_argument("--patients", type=int, default=6, help="number of patients (default 6)")
    ph.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ph.add_argument("--size", type=int, default=256, help="in-plane size in pixels (default 256)")
    ph.add_argument("--slices", type=int, default=48, help="number of axial slices (default 48)")
    ph.add_argument("--intercept", type=float, default=0.0, help="DICOM RescaleIntercept (0 as 3D-IRCADb-01, or -1024)")
    ph.set_defaults(func=_phantom)

    pr = sub.add_parser("prepare", help="extract and check a 3D-IRCADb-01 tree, write datalist.json")
    pr.add_argument("--ircadb", required=True, help="folder holding 3Dircadb1.N patient folders (zipped or not)")
    pr.add_argument("--out", required=True, help="output folder for extracted series and datalist.json")
    pr.add_argument("--mapping", help="JSON file mapping organ folders to classes (default: liver, bone, kidney)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the patient-wise split (default 0)")
    pr.add_argument("--val-fraction", type=float, default=0.2, help="fraction of patients for validation (0.2)")
    pr.add_argument("--test-fraction", type=float, default=0.2, help="fraction of patients for test (0.2)")
    pr.add_argument("--val-patients", nargs="*", default=[], help="patients pinned to validation (e.g. 7 or 3Dircadb1.7)")
    pr.add_argument("--test-patients", nargs="*", default=[], help="patients pinned to test")
    pr.add_argument("--overwrite", action="store_true", help="replace an earlier preparation in --out")
    pr.set_defaults(func=_prepare)

    co = sub.add_parser("compare", help="compare the runs of an MLflow experiment: table, CSV, Markdown, curves")
    co.add_argument("--experiment", default="liver-fcn", help="MLflow experiment (default liver-fcn)")
    co.add_argument("--metric", default="val_iou_liver", help="sort by the best value of this metric")
    co.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the bundle's store)")
    co.add_argument("--output-dir", default="bundle/eval", help="bundle output folder holding mlruns.db")
    co.add_argument("--out", help="folder for comparison.md/.csv and curves.png (default <output-dir>/compare/<experiment>)")
    co.set_defaults(func=_compare)

    su = sub.add_parser("summary", help="print the validation results of an MLflow run")
    su.add_argument("--experiment", default="liver-fcn", help="MLflow experiment (default liver-fcn)")
    su.add_argument("--run-name", help="run name (default: the latest run)")
    su.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the bundle's store)")
    su.add_argument("--output-dir", default="bundle/eval", help="bundle output folder holding mlruns.db")
    su.set_defaults(func=_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, FileExistsError) as e:
        print(f"liver-fcn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
