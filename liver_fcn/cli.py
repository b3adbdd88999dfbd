"""``liver-fcn`` command line: phantom data, 3D-IRCADb-01 preparation, run summaries and comparisons.

Training, evaluation and inference are MONAI bundle commands (``python -m monai.bundle run ...``);
this tool covers what comes before and after them.

Each subcommand imports what it needs inside its function: ``liver-fcn --help`` and the light
subcommands start without torch, MONAI or MLflow.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import os
import sys
import time
import warnings
from pathlib import Path

from liver_fcn.errors import InputError, Terminated
from liver_fcn.options import flag
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

    from liver_fcn.reporting import print_run_summary
    from liver_fcn.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(args.output_dir, args.tracking_uri)
    run_name = args.run_name
    if run_name is None:
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(args.experiment)
        runs = (
            client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
            if exp
            else []
        )
        if not runs:
            raise InputError(f"{uri}: no runs in experiment {args.experiment!r}")
        run_name = runs[0].info.run_name
    return 0 if print_run_summary(uri, args.experiment, run_name, log=print) else 1


def _synth(args: argparse.Namespace) -> int:
    from liver_fcn.data.synth import synthesize

    t0 = time.time()
    synthesize(
        args.masks,
        args.out,
        copies=args.copies,
        seed=args.seed,
        patients=args.patients,
        sampling_weight=args.weight,
        mapping=args.mapping,
        annotate=args.classes,
        overwrite=args.overwrite,
        abutting_masses=args.abutting_masses,
        workers=args.workers,
    )
    print(f"done in {time.time() - t0:.0f} s")
    return 0


def _warp(args: argparse.Namespace) -> int:
    from liver_fcn.data.warp import warp_patients

    t0 = time.time()
    warp_patients(
        args.dataset_dir,
        args.masks,
        args.out,
        sources=args.sources,
        targets=args.targets,
        sampling_weight=args.weight,
        min_liver_dice=args.min_liver_dice,
        low_weight=args.low_weight,
        spacing_mm=args.spacing,
        mapping=args.mapping,
        overwrite=args.overwrite,
        source_labels=args.source_labels,
        carry_missing=args.carry_missing,
    )
    print(f"done in {time.time() - t0:.0f} s")
    return 0


def _crossval(args: argparse.Namespace) -> int:
    from liver_fcn.crossval import crossval

    configs = ast.literal_eval(args.config) if args.config.strip().startswith("[") else [args.config]
    overrides = list(args.overrides)
    if overrides and overrides[0] == "--":
        overrides = overrides[1:]
    crossval(
        args.dataset_dir,
        configs,
        args.name,
        out_dir=args.out,
        overrides=overrides,
        extra_training=args.extra_training,
        extra_weights=args.extra_weight,
        patients=args.patients,
        experiment=args.experiment,
        tracking_uri=args.tracking_uri,
        scanner_shift=not args.no_scanner_shift,
        overwrite=args.overwrite,
    )
    return 0


def _sync(args: argparse.Namespace) -> int:
    from liver_fcn.offline import sync

    n = sync(args.folders, args.tracking_uri)
    print(f"{n} records sent")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from liver_fcn.reporting import best_column, compare_runs, comparison_table, log_comparison, plot_curves
    from liver_fcn.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(args.output_dir, args.tracking_uri)
    if args.crossval:
        from liver_fcn.crossval import compare_crossvals

        a, b = args.crossval
        experiment = args.experiment if args.experiment != "liver-fcn" else "liver-fcn-crossval"
        rows, table = compare_crossvals(uri, experiment, a, b)
        print(f"cross-validations {a!r} and {b!r} of experiment {experiment!r}, fold by fold:")
        print(table)
        out = Path(args.out or Path(args.output_dir) / "compare" / f"{a}-vs-{b}")
        write_text_atomic(out / "crossval_comparison.md", f"# {a} vs {b}\n\n" + table)
        print(f"wrote {out / 'crossval_comparison.md'}")
        return 0
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
    if args.log_run:
        from liver_fcn.runs import ui_link

        rid, exp_id = log_comparison(uri, args.experiment, args.metric, rows, out)
        print(f"logged the comparison as MLflow run {rid}: {ui_link(uri, exp_id, rid)}")
    if args.promote:
        from liver_fcn.registry import promote

        best = next((r for r in rows if r["status"] == "FINISHED"), None)
        if best is None:
            raise InputError(f"{uri}: no FINISHED run in experiment {args.experiment!r} to promote")
        version = promote(uri, args.registered_model, args.promote, best["run_id"])
        score = best.get(best_column(args.metric), float("nan"))
        print(
            f"models:/{args.registered_model}@{args.promote} -> version {version.version} "
            f"(run {best['run']}, best {args.metric} {score:.4f})"
        )
    return 0


def _segment(args: argparse.Namespace) -> int:
    from liver_fcn.api import run_inference

    options = {
        "precision": args.precision,
        "dicom_seg": args.dicom_seg,
        "rtstruct": args.rtstruct,
        "overlay": args.overlay,
    }
    if args.quiet:
        options["progress"] = False
    if args.series_uid:
        options["series_uid"] = args.series_uid
    t0 = time.time()
    summary = run_inference(
        args.input, args.output_dir, checkpoint=args.checkpoint, device=args.device, quiet=args.quiet, **options
    )
    if not args.quiet:
        n = len(summary["written"])
        print(f"{n} case{'s' if n != 1 else ''} segmented into {args.output_dir} in {time.time() - t0:.1f} s")
    return 0


def _series(args: argparse.Namespace) -> int:
    from liver_fcn.data.dicom import AUTO_RULE, list_series

    entries, auto = list_series(args.input)
    for e in entries:
        print(("* " if e is auto else "  ") + e.line())
    n = len(entries)
    if auto is None:
        print(f"{n} series; none is an axial CT image series, so --series auto would refuse this input")
    else:
        print(f"{n} series; * marks what --series auto takes ({AUTO_RULE})")
    return 0


class _Version(argparse.Action):
    """``--version``: the package's and the bundle's versions (read when asked, not at every start)."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the package and bundle versions and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from liver_fcn import versions

        v = versions()
        print(f"liver-fcn {v['liver_fcn']} (bundle {v['bundle']})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="liver-fcn", description=__doc__.splitlines()[0])
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)

    se = sub.add_parser(
        "segment",
        help="segment CT scans (DICOM folder, NIfTI file, datalist) with a trained model",
        description="Segment liver, bone and kidney in CT scans with the bundle's inference (the same code "
        "as python -m monai.bundle run inference), from any folder. Writes <case>_seg.nii.gz, "
        "<case>_report.json and, on request, an overlay and a DICOM SEG per case, and summary.json.",
    )
    se.add_argument(
        "-i",
        "--input",
        required=True,
        help="a DICOM folder (sub-folders included) or zip, a NIfTI file, a folder of NIfTI files or a datalist.json",
    )
    se.add_argument("-o", "--output_dir", required=True, help="folder for the masks, reports and summary.json")
    se.add_argument(
        "--checkpoint",
        help="model: a checkpoint file, a TorchScript export or models:/NAME@ALIAS "
        "(default: the bundle's models/model.pt)",
    )
    se.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda, cuda:N or mps")
    se.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="network precision (auto)")
    se.add_argument(
        "--series",
        "--series_uid",
        dest="series_uid",
        help="the series to take from a DICOM input holding several: its SeriesInstanceUID, or auto (the axial "
        "CT series with the most slices, then the thinnest spacing); list them with liver-fcn series INPUT",
    )
    se.add_argument("--dicom_seg", type=flag, default=False, help="also write a DICOM SEG (DICOM input; false)")
    se.add_argument(
        "--rtstruct", type=flag, default=False, help="also write an RTSTRUCT of contours (DICOM input, rt-utils; false)"
    )
    se.add_argument("--overlay", type=flag, default=True, help="also write an overlay PNG per case (true)")
    se.add_argument(
        "--quiet", action="store_true", help="print warnings and errors only (no progress bar, no log lines)"
    )
    se.set_defaults(func=_segment)

    ls = sub.add_parser(
        "series",
        help="list the DICOM series of a folder or zip, one line each",
        description="List the series of a DICOM folder (sub-folders included) or zip from their headers: UID, "
        "modality, orientation, files, size, slice spacing, description; mark the one --series auto takes.",
    )
    ls.add_argument("input", help="a DICOM folder or zip")
    ls.set_defaults(func=_series)

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
    pr.add_argument("--val_fraction", type=float, default=0.2, help="fraction of patients for validation (0.2)")
    pr.add_argument("--test_fraction", type=float, default=0.2, help="fraction of patients for test (0.2)")
    pr.add_argument(
        "--val_patients", nargs="*", default=[], help="patients pinned to validation (e.g. 7 or 3Dircadb1.7)"
    )
    pr.add_argument(
        "--test_patients",
        nargs="*",
        default=[],
        help="patients pinned to test; 'all' for a set of new patients to evaluate a trained model on",
    )
    pr.add_argument("--overwrite", action="store_true", help="replace an earlier preparation in --out")
    pr.set_defaults(func=_prepare)

    sy = sub.add_parser(
        "synth",
        help="synthesise training CTs from 3D-IRCADb-01 organ masks (domain randomisation)",
        description="Paint CT volumes from the organ masks of patients whose CT is not available (body outline, "
        "liver, vessels, bone, kidneys...) with random but physical densities, texture, blur and noise; write them "
        "as NIfTI with a datalist for `liver-fcn crossval --extra_training` or a training split.",
    )
    sy.add_argument(
        "--masks", required=True, help="folder of 3Dircadb1.N folders holding MASKS_DICOM.zip (or MASKS_DICOM)"
    )
    sy.add_argument("--out", required=True, help="output folder (one sub-folder per volume, datalist.json)")
    sy.add_argument(
        "--copies", type=int, default=1, help="renderings per patient, each with new random tissue (default 1)"
    )
    sy.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sy.add_argument("--patients", nargs="*", default=[], help="only these patients (e.g. 2 5 3Dircadb1.9)")
    sy.add_argument(
        "--weight",
        type=float,
        default=1.0,
        help="sampling weight of each synthetic volume's slices against real ones' 1.0 (default 1.0)",
    )
    sy.add_argument("--mapping", help="JSON file mapping organ folders to classes (default: liver, bone, kidney)")
    sy.add_argument(
        "--classes",
        nargs="*",
        default=None,
        help="classes the synthetic volumes annotate (default: all); the others are learnt from real CT only",
    )
    sy.add_argument("--overwrite", action="store_true", help="replace an earlier synthesis in --out")
    sy.add_argument(
        "--abutting_masses",
        action="store_true",
        help="also paint masses against the liver but outside it, labelled background (off by default)",
    )
    sy.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="patients painted side by side, one thread each (default: 2, or 1 on a 1-core machine; "
        "1-4 GB of memory each); the volumes do not depend on it",
    )
    sy.set_defaults(func=_synth)

    wa = sub.add_parser(
        "warp",
        help="warp real CT onto the anatomy of mask-only 3D-IRCADb-01 patients (label-driven registration)",
        description="Register each real patient's organ labels (body outline, liver, bone, kidneys, spleen, lungs) "
        "onto each mask-only patient's, affine then deformable, warp the real CT with the result and annotate it with "
        "the target's own masks; write NIfTI volumes, a datalist for --extra_training, warp_report.csv (Dice of the "
        "warped labels per pair) and one picture per pair.",
    )
    wa.add_argument(
        "--dataset_dir",
        "--dataset_dir",
        required=True,
        help="a liver-fcn prepare folder: its patients' CT and masks are warped",
    )
    wa.add_argument(
        "--masks", required=True, help="folder of 3Dircadb1.N folders holding MASKS_DICOM.zip (or MASKS_DICOM)"
    )
    wa.add_argument(
        "--out", required=True, help="output folder (one sub-folder per pair, datalist.json, warp_report.csv)"
    )
    wa.add_argument("--sources", nargs="*", default=[], help="only these real patients (default: all of the data set)")
    wa.add_argument("--targets", nargs="*", default=[], help="only these mask-only patients (e.g. 2 5 3Dircadb1.9)")
    wa.add_argument("--weight", type=float, default=1.0, help="sampling weight of each warped volume (default 1.0)")
    wa.add_argument(
        "--min_liver_dice",
        type=float,
        default=0.85,
        help="pairs whose warped liver has a lower Dice against the target's are dropped (default 0.85)",
    )
    wa.add_argument(
        "--low_weight",
        type=float,
        default=0.0,
        help="keep the pairs below --min_liver_dice at this weight instead of dropping them (default 0)",
    )
    wa.add_argument("--spacing", type=float, default=3.0, help="registration grid in mm (default 3)")
    wa.add_argument("--mapping", help="JSON file mapping organ folders to classes (default: liver, bone, kidney)")
    wa.add_argument(
        "--source_labels",
        nargs="*",
        default=[],
        help="classes annotated with the source patient's own masks warped with its CT (they lie exactly on the "
        "warped tissue) instead of the target's (default: none, the target's masks for every class)",
    )
    wa.add_argument(
        "--carry_missing",
        action="store_true",
        help="label targets without a mask of a --source_labels class with the source's too (default: that class "
        "stays unannotated there)",
    )
    wa.add_argument("--overwrite", action="store_true", help="replace an earlier warp in --out")
    wa.set_defaults(func=_warp)

    co = sub.add_parser("compare", help="compare the runs of an MLflow experiment: table, CSV, Markdown, curves")
    co.add_argument("--experiment", default="liver-fcn", help="MLflow experiment (default liver-fcn)")
    co.add_argument("--metric", default="val_iou_liver", help="sort by the best value of this metric")
    co.add_argument("--tracking_uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the bundle's store)")
    co.add_argument("--output_dir", default="bundle/eval", help="bundle output folder holding mlruns.db")
    co.add_argument(
        "--out", help="folder for comparison.md/.csv and curves.png (default <output-dir>/compare/<experiment>)"
    )
    co.add_argument(
        "--log_run",
        action="store_true",
        help="also record the comparison (table, CSV, curves) as a run of the experiment, tagged kind=comparison",
    )
    co.add_argument(
        "--promote",
        metavar="ALIAS",
        help="point this alias (e.g. champion) of the registered model at the best FINISHED run's version",
    )
    co.add_argument(
        "--registered_model", default="liver-fcn", help="registered model name for --promote (default liver-fcn)"
    )
    co.add_argument(
        "--crossval",
        nargs=2,
        metavar=("A", "B"),
        help="compare two cross-validations (liver-fcn crossval --name) fold by fold instead",
    )
    co.set_defaults(func=_compare)

    cv = sub.add_parser(
        "crossval",
        help="leave-one-patient-out cross-validation of a bundle recipe, one MLflow parent run",
        description="Train the bundle once per patient of a prepared data set without that patient (fixed "
        "iteration budget, last checkpoint: the held-out patient never chooses it), evaluate the held-out "
        "patient clean and after a simulated scanner change, and record it all as an MLflow parent run with a "
        "child run per fold. Bundle overrides for the training runs follow a '--'.",
    )
    cv.add_argument("--dataset_dir", required=True, help="folder holding a liver-fcn prepare datalist.json")
    cv.add_argument(
        "--config",
        default="['bundle/configs/train.json','bundle/configs/cpu.json']",
        help="training config file or Python list of them (default: train.json + cpu.json)",
    )
    cv.add_argument("--name", required=True, help="name of this cross-validation (its folder and MLflow tag)")
    cv.add_argument("--out", default="bundle/eval/crossval", help="folder for the folds (default bundle/eval/crossval)")
    cv.add_argument(
        "--extra_training",
        nargs="*",
        default=[],
        help="datalists (or their folders) whose training split joins every fold's training set",
    )
    cv.add_argument(
        "--extra_weight",
        nargs="*",
        type=float,
        default=[],
        help="sampling weight of each --extra_training set's volumes, in the same order "
        "(default: the weights their datalists record)",
    )
    cv.add_argument("--patients", nargs="*", default=[], help="hold out only these patients (default: all)")
    cv.add_argument("--experiment", default="liver-fcn-crossval", help="MLflow experiment (default liver-fcn-crossval)")
    cv.add_argument(
        "--tracking_uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or bundle/eval/mlruns.db)"
    )
    cv.add_argument("--no_scanner_shift", action="store_true", help="evaluate the clean scans only")
    cv.add_argument(
        "--overwrite",
        action="store_true",
        help="start a cross-validation of an existing --name afresh (its folder is replaced; runs a killed "
        "process left RUNNING are marked KILLED)",
    )
    cv.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then bundle overrides, e.g. -- --iterations 500")
    cv.set_defaults(func=_crossval)

    su = sub.add_parser("summary", help="print the validation results of an MLflow run")
    su.add_argument("--experiment", default="liver-fcn", help="MLflow experiment (default liver-fcn)")
    su.add_argument("--run_name", help="run name (default: the latest run)")
    su.add_argument("--tracking_uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the bundle's store)")
    su.add_argument("--output_dir", default="bundle/eval", help="bundle output folder holding mlruns.db")
    su.set_defaults(func=_summary)

    sn = sub.add_parser(
        "sync",
        help="send to its tracking server what a training kept while the server was away "
        "(<output_dir>/mlflow-offline/<run id>, or the whole folder)",
    )
    sn.add_argument("folders", nargs="+", help="folders of kept records")
    sn.add_argument("--tracking_uri", help="the server to send to (default: the one the run was recording to)")
    sn.set_defaults(func=_sync)
    return p


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its subcommands."""
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action.choices, dict):
            for sub in action.choices.values():
                if isinstance(sub, argparse.ArgumentParser):
                    found |= option_strings(sub)
    return found


def snake_case_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the options of the kebab spelling (``--tracking-uri``, accepted until the next
    release) in the one spelling of the CLI and the bundle (``--tracking_uri``), each said once on
    stderr. Arguments after ``--`` (bundle overrides) are left alone."""
    known = option_strings(parser)
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name.startswith("--") and "-" in name[2:] and name not in known:
            snake = "--" + name[2:].replace("-", "_")
            if snake in known:
                print(f"liver-fcn: {name} is deprecated, use {snake}", file=sys.stderr)
                out[i] = snake + eq + value
    return out


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    parser = build_parser()
    args = parser.parse_args(snake_case_options(parser, sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except (InputError, FileExistsError) as e:
        print(f"liver-fcn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"liver-fcn {args.command}: {e}", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
