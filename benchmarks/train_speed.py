"""Training speed of the FCN on this machine: seconds per slice for one Adam step, and peak memory.

Prints one line per configuration; asserts nothing. Random data of the configured size stands in
for CT slices (the step's cost does not depend on the values).

    python benchmarks/train_speed.py                 # quick configs and the paper config
    python benchmarks/train_speed.py --only quick    # just the quick config
    python benchmarks/train_speed.py --only quick --side_by_side 2
        # two trainings at once: each with PyTorch's default threads (one per core), then with the
        # cores shared out (OMP_NUM_THREADS = cores / 2), against one alone
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import torch

from liver_fcn.losses import PartialLabelCrossEntropyLoss
from liver_fcn.networks import FCN

CONFIGS = {
    # name: (variant, width, image size, batch)
    "quick": ("8s", 0.125, 256, 8),
    "quick-w1/4": ("8s", 0.25, 256, 8),
    "quick-4s": ("4s", 0.125, 256, 8),
    "paper": ("8s", 1.0, 512, 4),  # batch 32 in the paper; 4 fits a CPU's memory, time is per slice
    "paper-4s": ("4s", 1.0, 512, 4),
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench(variant: str, width: float, size: int, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    net = FCN(variant, in_channels=1, out_channels=4, width=width).to(device).train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-4, betas=(0.9, 0.99), eps=1e-8)
    loss_fn = PartialLabelCrossEntropyLoss(4)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, 4, (batch, 1, size, size), device=device)
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    params = sum(p.numel() for p in net.parameters()) / 1e6
    return {"step_s": step, "slice_s": step / batch, "params_m": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configurations to run")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--side_by_side", type=int, default=0, help="also run N trainings of the first config at once")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    names = args.only or list(CONFIGS)
    if args.side_by_side and not args.child:
        side_by_side(names[0], args.side_by_side, args.steps, args.device)
        return
    if args.child:  # one configuration per process, so that peak memory is its own
        variant, width, size, batch = CONFIGS[names[0]]
        r = bench(variant, width, size, batch, args.steps, device)
        print(
            f"{names[0]:<12} {variant:>7} {width:>6g} {size:>5} {batch:>5} {r['params_m']:>7.1f}M "
            f"{r['step_s']:>8.3f} {r['slice_s']:>8.4f} {peak_rss_gib():>7.2f}GiB",
            flush=True,
        )
        return
    print(f"training step, torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    print(
        f"{'config':<12} {'variant':>7} {'width':>6} {'size':>5} {'batch':>5} {'params':>8} "
        f"{'s/step':>8} {'s/slice':>8} {'peak RSS':>9}"
    )
    sys.stdout.flush()
    for name in names:
        cmd = [sys.executable, __file__, "--child", "--only", name, "--steps", str(args.steps), "--device", args.device]
        subprocess.run(cmd, check=True)


def side_by_side(name: str, n: int, steps: int, device: str) -> None:
    """One training step alone, then ``n`` at once with PyTorch's default threads, then ``n`` at once
    with the cores shared out: the median s/step of each process."""
    cores = os.cpu_count() or 1
    cmd = [sys.executable, __file__, "--child", "--only", name, "--steps", str(steps), "--device", device]
    print(f"{name}: {n} trainings side by side on {cores} cores (s/step of each process)")
    for label, count, threads in (
        ("alone, default threads", 1, None),
        (f"{n} at once, default threads", n, None),
        (f"{n} at once, {max(1, cores // n)} thread(s) each", n, max(1, cores // n)),
    ):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(count)]
        outs = [p.communicate()[0].split() for p in procs]
        print(f"  {label:<34} " + "  ".join(f"{float(o[6]):.3f}" for o in outs), flush=True)


if __name__ == "__main__":
    main()
