"""Where a bundle inference's time goes, step by step, on one series.

The bundle's ``inference.json`` is parsed as ``python -m monai.bundle run inference`` parses it, and
every transform of its pre- and post-processing (reading the series, resampling, the class map on the
input's grid, post-processing, each written file) is timed where it runs; the up-front check of the
input (``collect_cases``: every header read, the series chosen and checked), the network
(``Precision.seconds``) and the inferer's work around it (slices gathered into batches, the outputs
stitched into the volume) are timed too. ``--repeat 2`` runs the same case again in the same process: the
first run pays the libraries' first-call costs (pydicom's and matplotlib's lazy imports, page faults of
fresh buffers), the second is what each further case of a run costs. Prints a table; asserts nothing.

    python benchmarks/inference_breakdown.py [--input DICOM_FOLDER_OR_NIFTI] [--checkpoint model.pt] [--repeat 2]

Without ``--input`` a synthetic 512 x 512 x 119 DICOM series is written; without ``--checkpoint`` the
quick recipe's network with random weights is used (its masks are noise-like, which makes the
post-processing work harder than a trained model's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


class Timed:
    """A transform that adds its wall time to ``times[name]``."""

    def __init__(self, transform, times: dict, name: str) -> None:
        self.transform, self.times, self.name = transform, times, name

    def __call__(self, data):
        t0 = time.perf_counter()
        try:
            return self.transform(data)
        finally:
            self.times[self.name] += time.perf_counter() - t0


def _wrap(compose, times: dict, stage: str) -> None:
    compose.transforms = tuple(Timed(t, times, f"{stage}: {type(t).__name__}") for t in compose.transforms)


def one_run(args, checkpoint: str, out: Path) -> tuple[dict, float]:
    from monai.bundle import ConfigParser

    times: dict = defaultdict(float)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle/configs/inference.json"))
    parser.update(
        {"input": args.input, "checkpoint": checkpoint, "output_dir": str(out), "overlay": not args.no_overlay}
    )
    t0 = time.perf_counter()
    parser.get_parsed_content("all_cases")
    times["check: collect_cases (headers read, series chosen and checked)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    network = parser.get_parsed_content("network")
    times["start: checkpoint loaded, network built"] = time.perf_counter() - t0
    inferer = parser.get_parsed_content("inferer")  # the instance the evaluator is given

    class TimedInferer(type(inferer)):
        def __call__(self, *a, **k):
            t = time.perf_counter()
            try:
                return super().__call__(*a, **k)
            finally:
                times["inferer: slices batched, outputs stitched (network excluded)"] += time.perf_counter() - t

    inferer.__class__ = TimedInferer
    _wrap(parser.get_parsed_content("preprocessing"), times, "read")
    _wrap(parser.get_parsed_content("postprocessing"), times, "after")
    t0 = time.perf_counter()
    parser.get_parsed_content("run")
    total = time.perf_counter() - t0
    times["network (forward passes)"] = network.seconds
    times["inferer: slices batched, outputs stitched (network excluded)"] -= network.seconds
    return times, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", help="a DICOM series folder (or zip) or a NIfTI file (default: a synthetic series)")
    p.add_argument("--checkpoint", help="a liver-fcn checkpoint (default: the quick network, random weights)")
    p.add_argument("--slices", type=int, default=119, help="slices of the synthetic series")
    p.add_argument("--repeat", type=int, default=2, help="runs of the same case in this process")
    p.add_argument("--no-overlay", action="store_true", help="leave the overlay PNG out")
    args = p.parse_args()
    t_start = time.perf_counter()
    import torch
    from inference_speed import QUICK, make_series  # the other inference benchmark's series and network

    import liver_fcn.inference  # noqa: F401 - the bundle's imports, timed apart from the runs

    imports = time.perf_counter() - t_start
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.input is None:
            args.input = str(make_series(tmp, args.slices))
        checkpoint = args.checkpoint
        if checkpoint is None:
            from liver_fcn.networks import FCN

            torch.manual_seed(0)
            checkpoint = str(tmp / "quick_random.pt")
            torch.save(
                {
                    "model": FCN("8s", in_channels=1, out_channels=4, width=QUICK["width"]).state_dict(),
                    "settings": QUICK,
                },
                checkpoint,
            )
        print(
            f"input {args.input}; checkpoint {args.checkpoint or 'quick recipe, random weights'}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        print(f"torch, MONAI and liver_fcn imported in {imports:.1f} s (not part of the runs)")
        runs = [one_run(args, checkpoint, tmp / f"out{i}") for i in range(args.repeat)]
    names = list(runs[0][0])
    print(f"\n{'step':<64}" + "".join(f"{'run ' + str(i + 1):>9}" for i in range(len(runs))))
    for name in names:
        print(f"{name:<64}" + "".join(f"{r[0].get(name, 0.0):>8.3f}s" for r in runs))
    for label, value in (
        ("the run (check excluded)", lambda r: r[1]),
        ("outside the network (check included)", lambda r: r[1] - r[0]["network (forward passes)"] + r[0][names[0]]),
    ):
        print(f"{label:<64}" + "".join(f"{value(r):>8.3f}s" for r in runs))


if __name__ == "__main__":
    main()
