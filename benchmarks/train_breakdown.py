"""Where a bundle training's time goes: caching, data, the step, validation, checkpoints, MLflow.

Runs the bundle's own training (train.json, with cpu.json for ``--config cpu``) in this process for a
short budget, with ignite's HandlersTimeProfiler on the trainer, and prints the time per iteration
split into data (loading, slice augmentation, collation: what the trainer waits for between steps),
the batch stage (``prepare_batch``: transfer to the device, batch augmentation there) and the step
(forward, backward, Adam), each handler's time (validation, checkpoint savers, MLflow
logging ...), the FLOP rate of the step (counted once with torch's FlopCounterMode) against the
device's dense bf16 peak where it is known, the same split after the first period (workers started,
device warm), the loader's own rate with no step waiting on it, and the projected time of the full
recipe. Asserts nothing.

    python benchmarks/train_breakdown.py --dataset_dir data/ircadb                  # cpu.json, 100 iterations
    python benchmarks/train_breakdown.py --dataset_dir data/ircadb --config paper   # train.json (a GPU)
    python benchmarks/train_breakdown.py --dataset_dir data/ircadb --no_mlflow      # without MLflow
"""

from __future__ import annotations

import argparse
import ast
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from mlflow_free import mlflow_free_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"

#: dense bf16 peak (TFLOP/s) of the devices we know, by a part of their name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "T4": 65.0}


def step_flops(network: torch.nn.Module, batch: int, size: tuple[int, int], channels: int, device) -> float:
    """FLOPs of one training step's forward and backward at ``batch`` x ``size`` (counted on one
    sample: they grow linearly with the batch, and one sample keeps the count's memory small)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, channels, *size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        network(x).float().sum().backward()
    network.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()) * batch


def loader_rate(loader, batches: int, batch: int, workers: int) -> None:
    """Batches a second the training loader gives alone (no step waiting on it)."""
    it = iter(loader)
    next(it)  # the workers are up (persistent) or started here
    t, drawn = time.perf_counter(), 0
    while drawn < batches:
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            continue
        drawn += 1
    seconds = time.perf_counter() - t
    print(
        f"  the loader alone ({workers} workers): {drawn / seconds:.1f} batches/s, "
        f"{drawn * batch / seconds:.0f} slices/s"
    )


def group(name: str) -> str:
    lowered = name.lower()
    for key, label in (
        ("validation", "validation"),
        ("checkpoint", "checkpoints"),
        ("saver", "checkpoints"),
        ("mlflow", "MLflow logging"),
        ("stats", "console logging"),
        ("progress", "progress"),
    ):
        if key in lowered:
            return label
    return "other handlers"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset_dir", required=True, help="a prepared data set (datalist.json)")
    p.add_argument("--config", choices=("cpu", "paper"), default="cpu", help="cpu.json over train.json, or train.json")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--epoch_length", type=int, default=50, help="iterations between two validations")
    p.add_argument("--out", help="output folder (default: a temporary one)")
    p.add_argument(
        "--loader_batches", type=int, default=30, help="batches drawn from the loader alone after the run (0: none)"
    )
    p.add_argument("--no_mlflow", action="store_true", help="leave the MLflow handlers out (no MLflow install)")
    p.add_argument("overrides", nargs="*", help="more bundle overrides, key=value (e.g. batch_size=8)")
    args = p.parse_args()

    from ignite.handlers import HandlersTimeProfiler
    from monai.bundle import ConfigParser, ConfigWorkflow

    out = Path(args.out or tempfile.mkdtemp(prefix="train_breakdown-"))
    files = [str(CONFIGS / "train.json")] + ([str(CONFIGS / "cpu.json")] if args.config == "cpu" else [])
    overrides = {
        "dataset_dir": args.dataset_dir,
        "output_dir": str(out / "eval"),
        "ckpt_dir": str(out / "models"),
        "tracking_uri": f"sqlite:///{out / 'eval' / 'mlruns.db'}",
        "iterations": args.iterations,
        "epoch_length": args.epoch_length,
        "warmup_iterations": min(100, args.iterations // 2),
        "registered_model_name": "",
    }
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a plain string
            overrides[key] = value
    recipe = ConfigParser()  # the recipe's own budget and validation period, before the overrides above
    recipe.read_config(files)
    if args.no_mlflow:
        overrides.update(mlflow_free_overrides(recipe))
    workflow = ConfigWorkflow(config_file=files, workflow_type="train", **overrides)
    workflow.initialize()
    parser = workflow.parser
    budget = {k: int(recipe[k]) for k in ("iterations", "epoch_length")}

    t0 = time.perf_counter()
    trainer = parser.get_parsed_content("train#trainer")  # builds the data sets: caching happens here
    caching = time.perf_counter() - t0
    device = torch.device(parser.get_parsed_content("device"))
    prepare = trainer.prepare_batch  # the batch stage (to the device, batch augmentation) runs inside the step
    prepare_times: list[float] = []  # the batch stage's seconds, iteration by iteration

    def timed_prepare(*args, **kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = prepare(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prepare_times.append(time.perf_counter() - t)
        return out

    trainer.prepare_batch = timed_prepare
    profiler = HandlersTimeProfiler()
    profiler.attach(trainer)
    t0 = time.perf_counter()
    workflow.run()
    wall = time.perf_counter() - t0

    rows = profiler.get_results()
    by_name = {str(r[0]): r for r in rows}
    n = int(trainer.state.iteration)
    data, step = float(by_name["Dataflow"][2]), float(by_name["Processing"][2])
    batch_stage = sum(prepare_times)
    step -= batch_stage
    handlers: dict[str, float] = defaultdict(float)
    by_kind: dict[str, float] = defaultdict(float)  # per iteration, per period (epoch), once a run
    for r in rows:
        if str(r[0]) in ("Total", "Processing", "Dataflow") or r[2] in ("not triggered", "not yet triggered"):
            continue
        handlers[group(str(r[0]))] += float(r[2])
        event = str(r[1])
        kind = "period" if event.startswith("EPOCH") else "once" if event in ("STARTED", "COMPLETED") else "iteration"
        by_kind[kind] += float(r[2])
    network = parser.get_parsed_content("network")
    batch, size = int(parser.get_parsed_content("batch_size")), int(parser.get_parsed_content("image_size"))
    crop = parser.get_parsed_content("train_crop")  # the window each sample is cut to, if any
    size = tuple(int(c) for c in crop) if crop else (size, size)
    device = next(network.parameters()).device
    channels = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    flops = step_flops(network, batch, size, channels, device)
    step_mean = step / max(n, 1)
    rate = flops / step_mean / 1e12

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bundle training breakdown: {args.config}, {n} iterations of batch {batch} at {size[0]} x {size[1]}, {name}")
    print(f"  caching the data sets (before the first step): {caching:7.1f} s")
    print(f"  wall time of the run:                          {wall:7.1f} s")
    print(f"  {'part':<22} {'total s':>9} {'per iteration s':>16} {'share':>7}")
    total = data + batch_stage + step + sum(handlers.values())
    parts = [("data (wait for batch)", data), ("batch stage", batch_stage), ("step", step)]
    for label, seconds in [*parts, *sorted(handlers.items())]:
        print(f"  {label:<22} {seconds:9.2f} {seconds / max(n, 1):16.4f} {100 * seconds / total:6.1f}%")
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    peak_text = f", {100 * rate / peak:.1f} % of the {peak:g} TFLOP/s dense bf16 peak" if peak else ""
    print(f"  step: {flops / 1e9:.1f} GFLOP, {rate:.3f} TFLOP/s{peak_text}; {batch / step_mean:.1f} slices/s")
    skip = min(args.epoch_length, n // 2)  # the first period: workers starting, device warming up
    size_ok = min(len(profiler.dataflow_times), len(profiler.processing_times), len(prepare_times))
    if size_ok > skip:
        flows, procs, preps = (
            np.asarray(x[skip:size_ok]) for x in (profiler.dataflow_times, profiler.processing_times, prepare_times)
        )
        print(
            f"  after the first {skip} iterations, an iteration: data {flows.mean():.4f} s, batch stage "
            f"{preps.mean():.4f} s, step {(procs - preps).mean():.4f} s"
        )
    if args.loader_batches:
        loader_rate(trainer.data_loader, args.loader_batches, batch, int(parser.get_parsed_content("num_workers")))
    periods = budget["iterations"] // budget["epoch_length"]
    per_period = by_kind["period"] / max(n // args.epoch_length, 1)  # validation, checkpoints, epoch logs
    per_iteration = (data + batch_stage + step + by_kind["iteration"]) / max(n, 1)
    projected = budget["iterations"] * per_iteration + periods * per_period + by_kind["once"]
    print(
        f"  the recipe ({budget['iterations']} iterations of {per_iteration:.3f} s, {periods} periods' "
        f"validation and checkpoints of {per_period:.1f} s, {by_kind['once']:.1f} s at start and end): "
        f"about {projected / 60:.1f} min of training after {caching:.0f} s of caching"
    )


if __name__ == "__main__":
    main()
