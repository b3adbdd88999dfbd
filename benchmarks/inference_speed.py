"""Inference speed and memory of the bundle on a synthetic 512 x 512 x N DICOM series.

One run prints, for the same series and the same checkpoint:

* the bundle command as a user types it (``python -m monai.bundle run inference``, default
  settings): end-to-end wall time including Python's start, the engine's run time, the network's
  own time (as the bundle reports it), everything else of the run (loading, preprocessing, the
  class map on the input grid, post-processing, writing), and the peak resident memory;
* a naive MONAI pipeline of the same network, as a MONAI user would first write it: fp32,
  ``Resized`` with its 3D anti-aliasing to the network's grid, softmax, ``Invertd`` of the
  full-resolution class probabilities, ``argmax``, ``KeepLargestConnectedComponentd`` on the whole
  volume - timed the same way;
* the speed-up, and the Dice of each class between the two masks.

``--slices 400`` measures memory on a long series. ``--network-only`` times the full-width
FCN-8s alone on 512 x 512 slices in fp32 and in bf16 (with the GFLOP/s reached) instead. The
checkpoint is ``--checkpoint`` or, without one, the quick recipe's network (width 1/8, 1.6 mm) with
random weights (then the masks are noise-like and post-processing works harder than on a real
model). Each run is a separate process; its wall time is measured from here and its peak RSS by the
process itself (VmHWM); nothing is asserted.

    python benchmarks/inference_speed.py [--slices 119] [--checkpoint bundle/models/model.pt]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from liver_fcn import CLASS_NAMES

REPO = Path(__file__).resolve().parents[1]
QUICK = {
    "variant": "8s",
    "width": 0.125,
    "in_channels": 1,
    "class_names": list(CLASS_NAMES),
    "pixel_spacing": 1.6,
    "image_size": 256,
    "hu_window": [-250, 450],
    "intensity_mean": 0.19,
    "slice_distance": 2.5,
}


#: runs a module or script and reports its own peak RSS at exit. The peak is read from /proc/self/status
#: (VmHWM, per address space): ``ru_maxrss`` of a child started from a large parent inherits the
#: parent's peak across exec, which would credit this benchmark's own memory to the command.
WRAP = """
import atexit, runpy, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("\\nPEAK_RSS_KB " + line.split()[1] + "\\n")
atexit.register(peak)
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target] + sys.argv[3:]
if kind == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


def measure(kind: str, target: str, args: list[str]) -> tuple[float, float, str]:
    """Run ``python -m target args`` (kind ``-m``) or ``python target args``; wall seconds, the
    process's own peak RSS (GB), its stdout+stderr."""
    cmd = [sys.executable, "-c", WRAP, kind, target, *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{target} failed ({r.returncode}):\n{out[-3000:]}")
    kb = [int(m) for m in re.findall(r"PEAK_RSS_KB (\d+)", out)]
    return wall, (kb[-1] / 1e6 if kb else float("nan")), out


def naive_child(args) -> None:
    """The naive MONAI pipeline (see the module docstring); prints its timings as JSON."""
    import time as _t

    t_start = _t.perf_counter()
    import torch
    from monai.data import DataLoader, Dataset, PydicomReader, decollate_batch
    from monai.inferers import SliceInferer
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        Invertd,
        KeepLargestConnectedComponentd,
        LoadImaged,
        Orientationd,
        Resized,
        SaveImaged,
        ScaleIntensityRanged,
        ShiftIntensityd,
    )

    from liver_fcn.checkpoint import load_model_state
    from liver_fcn.inference import Precision
    from liver_fcn.networks import FCN

    state, settings = load_model_state(args.checkpoint)
    net = FCN(settings["variant"], in_channels=1, out_channels=len(settings["class_names"]), width=settings["width"])
    net.load_state_dict(state)
    net = Precision(net.eval(), "fp32", channels_last=False)
    size = settings["image_size"]
    pre = Compose(
        [
            LoadImaged("image", reader=PydicomReader()),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS"),
            Resized("image", spatial_size=(size, size, -1), mode="bilinear", anti_aliasing=True),
            ScaleIntensityRanged("image", *settings["hu_window"], 0.0, 1.0, clip=True),
            ShiftIntensityd("image", -settings["intensity_mean"]),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )
    post = Compose(
        [
            Activationsd("pred", softmax=True),
            Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted("pred", argmax=True),
            KeepLargestConnectedComponentd("pred", applied_labels=[1], independent=True),
            SaveImaged(
                "pred",
                output_dir=args.out,
                output_postfix="seg",
                output_dtype="uint8",
                separate_folder=False,
                print_log=False,
            ),
        ]
    )
    loader = DataLoader(Dataset([{"image": args.input}], pre), batch_size=1)
    inferer = SliceInferer(roi_size=(-1, -1), sw_batch_size=16, spatial_dim=2)
    t_run = _t.perf_counter()
    with torch.no_grad():
        for batch in loader:
            batch["pred"] = inferer(batch["image"], net)
            for item in decollate_batch(batch):
                post(item)
    t_end = _t.perf_counter()
    print(json.dumps({"run": t_end - t_run, "network": net.seconds, "startup": t_run - t_start}))


def dice_per_class(a_path: Path, b_path: Path) -> list[float]:
    import nibabel as nib
    import numpy as np

    a, b = (np.asarray(nib.load(str(p)).dataobj) for p in (a_path, b_path))
    if a.shape != b.shape:
        raise RuntimeError(f"mask shapes differ: {a.shape} vs {b.shape}")
    out = []
    for c in (1, 2, 3):
        x, y = a == c, b == c
        s = int(x.sum() + y.sum())
        out.append(1.0 if s == 0 else 2.0 * float((x & y).sum()) / s)
    return out


def make_series(tmp: Path, slices: int) -> Path:
    from liver_fcn.data.phantom import write_phantom_patient

    patient = write_phantom_patient(tmp / "dicom", 1, 11, size=512, slices=slices)
    with zipfile.ZipFile(patient / "PATIENT_DICOM.zip") as zf:
        zf.extractall(patient)
    return patient / "PATIENT_DICOM"


def end_to_end(args) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        series = make_series(tmp, args.slices)
        checkpoint = args.checkpoint
        if checkpoint is None:
            from liver_fcn.networks import FCN

            torch.manual_seed(0)
            net = FCN("8s", in_channels=1, out_channels=4, width=QUICK["width"])
            checkpoint = str(tmp / "quick_random.pt")
            torch.save({"model": net.state_dict(), "settings": QUICK}, checkpoint)
        print(
            f"synthetic DICOM series 512 x 512 x {args.slices} written in {time.perf_counter() - t0:.0f} s; "
            f"checkpoint {args.checkpoint or 'quick recipe, random weights'}; torch {torch.__version__}, "
            f"{os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
        )
        rows = {}
        bundle = [
            "run",
            "inference",
            "--config_file",
            "bundle/configs/inference.json",
            "--input",
            str(series),
            "--checkpoint",
            checkpoint,
            "--output_dir",
            str(tmp / "ours"),
            "--overlay",
            "false",
        ]
        wall, rss, out = measure("-m", "monai.bundle", bundle)
        m = re.search(r"written to .* \(([\d.]+) s, network ([\d.]+) s, (\w+)", out)
        run, network, precision = float(m.group(1)), float(m.group(2)), m.group(3)
        rows[f"bundle ({precision}, body grid)"] = dict(
            wall=wall, startup=wall - run, run=run, network=network, rss=rss
        )
        if not args.no_naive:
            naive = ["--naive-child", "--input", str(series), "--checkpoint", checkpoint, "--out", str(tmp / "naive")]
            wall, rss, out = measure("script", __file__, naive)
            r = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
            rows["naive MONAI (fp32)"] = dict(
                wall=wall, startup=wall - r["run"], run=r["run"], network=r["network"], rss=rss
            )
        print(
            f"\n{'pipeline':<26} {'wall':>7} {'start-up':>9} {'run':>7} {'network':>8} "
            f"{'non-network':>12} {'peak RSS':>9}"
        )
        for name, r in rows.items():
            print(
                f"{name:<26} {r['wall']:>6.1f}s {r['startup']:>8.1f}s {r['run']:>6.1f}s {r['network']:>7.2f}s "
                f"{r['run'] - r['network']:>11.2f}s {r['rss']:>7.2f}GB"
            )
        print(
            "(wall: the whole command, Python's start included; run: the engine's run; non-network: run minus network)"
        )
        if not args.no_naive:
            ours_row, naive_row = rows[list(rows)[0]], rows[list(rows)[1]]
            end_to_end = naive_row["wall"] / ours_row["wall"]
            non_network = (naive_row["run"] - naive_row["network"]) / max(ours_row["run"] - ours_row["network"], 1e-9)
            print(
                f"\nspeed-up of the bundle over the naive pipeline: {end_to_end:.1f}x end to end, "
                f"{non_network:.1f}x on the non-network work"
            )
            ours = next((tmp / "ours").glob("*_seg.nii.gz"))
            theirs = next((tmp / "naive").glob("*_seg.nii.gz"))
            d = dice_per_class(ours, theirs)
            print(
                f"masks, Dice bundle vs naive: liver {d[0]:.4f}, bone {d[1]:.4f}, kidney {d[2]:.4f} "
                "(the bundle resamples in physical units and post-processes more, so they need not be identical)"
            )


def network_only(args) -> None:
    """Full-width FCN-8s on 512 x 512 slices, fp32 vs bf16 (channels-last), network alone."""
    import torch

    from liver_fcn.inference import Precision, native_bf16
    from liver_fcn.networks import FCN

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = FCN("8s", in_channels=1, out_channels=4, width=1.0).eval().to(device)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        torch.nn.init.normal_(getattr(net, name).weight, 0, 0.02)
    flops = 0.0

    def hook(m, inp, out):
        nonlocal flops
        k = m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, torch.nn.ConvTranspose2d):
            flops += 2.0 * inp[0].numel() * m.out_channels * k / m.groups
        else:
            flops += 2.0 * out.numel() * (m.in_channels // m.groups) * k

    hooks = [
        m.register_forward_hook(hook)
        for m in net.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    with torch.no_grad():
        net(torch.zeros(1, 1, args.size, args.size, device=device))
    for h in hooks:
        h.remove()
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    labels = {}
    settings = ["fp32"] + (["bf16"] if native_bf16(device) else [])
    print(f"full FCN-8s, {args.size} x {args.size}, {flops / 1e9:.0f} GFLOP a slice, batches of {args.batch}, {device}")
    for precision in settings:
        wrapped = Precision(net, precision, channels_last=True)
        with torch.no_grad():
            wrapped(x)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            reps = 2 if device.type == "cpu" else 10
            t0 = time.perf_counter()
            for _ in range(reps):
                y = wrapped(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_slice = (time.perf_counter() - t0) / reps / args.batch
        labels[precision] = y.argmax(1)
        agree = (labels[precision] == labels["fp32"]).float().mean().item()
        print(
            f"  {precision}: {per_slice * 1000:.0f} ms a slice = "
            f"{per_slice * args.slices:.1f} s for {args.slices} slices, "
            f"{flops / per_slice / 1e9:.0f} GFLOP/s; labels equal to fp32's on {100 * agree:.2f} % of pixels"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=119)
    p.add_argument("--checkpoint", help="a liver-fcn checkpoint (default: the quick network, random weights)")
    p.add_argument("--no-naive", action="store_true", help="time only the bundle (for long series)")
    p.add_argument("--network-only", action="store_true", help="time the full-width FCN-8s alone, fp32 vs bf16")
    p.add_argument("--size", type=int, default=512, help="slice size for --network-only")
    p.add_argument("--batch", type=int, default=8, help="slices per forward pass for --network-only")
    p.add_argument("--naive-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_child:
        return naive_child(args)
    if args.network_only:
        return network_only(args)
    end_to_end(args)


if __name__ == "__main__":
    main()
