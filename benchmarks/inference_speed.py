"""Inference speed of the full-width FCN-8s on one 512 x 512 x 120 phantom volume.

For each setting - fp32, fp32 with channels-last, bf16 autocast with channels-last - it prints the
seconds per volume and per slice of the network over the whole volume (slices batched as the
bundle's SliceInferer does), the achieved GFLOP/s beside this process's measured matrix-multiply
peak in the same precision, the peak memory, and the Dice of each class between the setting's
labels and the fp32 labels (a setting is acceptable when every Dice is >= 0.995). A setting slower
than ``--budget`` seconds per volume is timed on the first slices and its volume time extrapolated
(marked ``*``). Then it times the whole bundle command (DICOM loading, preprocessing, inference,
inversion to the input grid, writing) with the bundle's default setting. Nothing is asserted.

The weights are random (He-initialised backbone, random score layers), which gives spatially varied
class maps; class boundaries sit at near-ties of the logits, so the Dice comparison is a stringent
test of numerical agreement, not of segmentation quality.

    python benchmarks/inference_speed.py [--slices 120] [--size 512] [--no-bundle]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"fp32": ("fp32", False), "fp32+channels_last": ("fp32", True), "bf16+channels_last": ("bf16", True)}


def make_network(seed: int = 0) -> nn.Module:
    from liver_fcn.networks import FCN

    torch.manual_seed(seed)
    net = FCN("8s", in_channels=1, out_channels=4, width=1.0)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        nn.init.normal_(getattr(net, name).weight, 0, 0.02)
        nn.init.normal_(getattr(net, name).bias, 0, 0.5)
    return net.eval()


def count_flops(net: nn.Module, size: int) -> float:
    """Multiply-adds x 2 of the convolutions for one slice."""
    total = 0.0

    def hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        if isinstance(m, nn.ConvTranspose2d):
            total += 2.0 * inp[0].numel() * m.out_channels * k / m.groups
        else:
            total += 2.0 * out.numel() * (m.in_channels // m.groups) * k

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        net(torch.zeros(1, 1, size, size))
    for h in handles:
        h.remove()
    return total


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 4.0) -> float:
    """Best GFLOP/s of square matrix products in ``dtype`` over a few sizes and repeats.

    On CUDA, fp32 convolutions run in TF32 (cuDNN's default, ``torch.backends.cudnn.allow_tf32``), so
    the fp32 peak is measured with matrix products in the same mode.
    """
    sizes = (512, 1024, 2048, 3072) + ((4096, 8192) if device.type == "cuda" else ())
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    best = 0.0
    try:
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            t0 = time.perf_counter()
            a @ b  # warm-up; also tells how long one product takes
            if device.type == "cuda":
                torch.cuda.synchronize()
            once = time.perf_counter() - t0
            if once > seconds:  # a slow path (bf16 without hardware support): stop growing
                best = max(best, 2.0 * n**3 / once / 1e9)
                break
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 4:
                a @ b
                reps += 1
                if device.type == "cuda" and reps % 16 == 0:
                    torch.cuda.synchronize()  # keep the queue short so the loop measures work done
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return best


def sig3(x: float) -> str:
    """Three significant digits without an exponent: 0.00123, 1.62, 231, 1618."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def volume_input(path: Path, size: int, slices: int) -> np.ndarray:
    """The phantom's preprocessed volume (1, size, size, slices) as the bundle feeds it, cached in ``path``."""
    if path.exists():
        return np.load(path)
    from liver_fcn.data.phantom import make_phantom

    ct = make_phantom(11, size=size, slices=slices).ct.astype(np.float32)  # (z, y, x)
    x = np.clip((ct + 250.0) / 700.0, 0, 1) - 0.19
    x = np.ascontiguousarray(np.transpose(x, (2, 1, 0)))[None]
    np.save(path, x)
    return x


def child(args) -> None:
    from monai.inferers import SliceInferer

    from liver_fcn.inference import Precision

    device = torch.device(args.device)
    precision, channels_last = SETTINGS[args.setting]
    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32, device)
    vol = torch.from_numpy(volume_input(Path(args.cache), args.size, args.slices))[None].to(device)
    net = Precision(make_network().to(device), precision, channels_last)
    inferer = SliceInferer(roi_size=(-1, -1), sw_batch_size=args.batch, spatial_dim=2)
    with torch.no_grad():
        net(vol[..., 0].expand(args.batch, -1, -1, -1))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        first = inferer(vol[..., : args.batch], net)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_batch = time.perf_counter() - t0
        n = args.slices if per_batch * args.slices / args.batch <= args.budget else args.batch * 2
        elapsed = float("inf")
        for _ in range(3 if device.type == "cuda" else 1):  # a GPU pass is short: best of three
            t0 = time.perf_counter()
            logits = inferer(vol[..., :n], net)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = min(elapsed, time.perf_counter() - t0)
    labels = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
    np.save(Path(args.cache).with_name(f"labels_{args.setting}.npy"), labels)
    flops = count_flops(make_network(), args.size) * n
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"setting": args.setting, "slices": n, "seconds": elapsed, "gflops": flops / elapsed / 1e9,
                      "peak_gflops": peak, "memory_gib": mem, "first_batch_s": per_batch}))
    del first


def dice(a: np.ndarray, b: np.ndarray) -> dict:
    out = {}
    for c in range(1, 4):
        x, y = a == c, b == c
        s = x.sum() + y.sum()
        out[c] = 1.0 if s == 0 else 2.0 * (x & y).sum() / s
    return out


def bundle_end_to_end(tmp: Path, size: int, slices: int) -> tuple[float, str]:
    """Time `python -m monai.bundle run inference` on the phantom written as DICOM, default settings."""
    from liver_fcn.data.phantom import write_phantom_patient

    patient = write_phantom_patient(tmp / "dicom", 1, 11, size=size, slices=slices)
    import zipfile

    with zipfile.ZipFile(patient / "PATIENT_DICOM.zip") as zf:
        zf.extractall(patient)
    settings = {"variant": "8s", "width": 1.0, "in_channels": 1, "class_names": ["background", "liver", "bone", "kidney"],
                "pixel_spacing": 380.0 / size, "image_size": size, "hu_window": [-250, 450], "intensity_mean": 0.19}
    torch.save({"model": make_network().state_dict(), "settings": settings}, tmp / "model.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(REPO / "bundle/configs/inference.json"),
           "--input", str(patient / "PATIENT_DICOM"), "--output_dir", str(tmp / "out"), "--checkpoint", str(tmp / "model.pt"),
           "--overlay", "false"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    cfg = json.loads((REPO / "bundle/configs/inference.json").read_text())
    return elapsed, f"precision={cfg['precision']}, channels_last={cfg['channels_last']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=120)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="slices per network call (SliceInferer sw_batch_size)")
    p.add_argument("--budget", type=float, default=600.0, help="seconds per setting before extrapolating")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bundle", action="store_true", help="skip the end-to-end bundle timing")
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.setting:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "volume.npy"
        t0 = time.perf_counter()
        volume_input(cache, args.size, args.slices)
        print(f"phantom {args.size} x {args.size} x {args.slices} built in {time.perf_counter() - t0:.0f} s; "
              f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
        results = {}
        for name in SETTINGS:
            cmd = [sys.executable, __file__, "--setting", name, "--cache", str(cache), "--slices", str(args.slices),
                   "--size", str(args.size), "--batch", str(args.batch), "--budget", str(args.budget), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
        ref = np.load(tmp / "labels_fp32.npy")
        print(f"\n{'setting':<20} {'s/volume':>9} {'s/slice':>8} {'GFLOP/s':>8} {'peak':>7} {'% peak':>7} {'memory':>8}   Dice vs fp32 (liver, bone, kidney)")
        fastest = None
        for name, r in results.items():
            labels = np.load(tmp / f"labels_{name}.npy")
            n = labels.shape[-1]
            d = dice(labels, ref[..., :n])
            per_slice = r["seconds"] / r["slices"]
            extrap = "*" if r["slices"] < args.slices else " "
            ok = min(d.values()) >= 0.995
            print(f"{name:<20} {sig3(per_slice * args.slices):>8}{extrap} {sig3(per_slice):>8} {r['gflops']:>8.0f} {r['peak_gflops']:>7.0f} "
                  f"{100 * r['gflops'] / r['peak_gflops']:>6.0f}% {r['memory_gib']:>6.2f}GiB   "
                  f"{d[1]:.4f} {d[2]:.4f} {d[3]:.4f} {'ok' if ok else 'too different'}")
            if ok and (fastest is None or per_slice < fastest[1]):
                fastest = (name, per_slice)
        print(f"\nfastest setting within Dice 0.005 of fp32: {fastest[0]}   (* = extrapolated from the first slices)")
        if not args.no_bundle:
            seconds, default = bundle_end_to_end(tmp, args.size, args.slices)
            print(f"bundle inference command, end to end ({default}): {seconds:.1f} s per volume, "
                  f"{seconds / args.slices:.3f} s per slice (DICOM loading, preprocessing, inference, inversion, writing)")


if __name__ == "__main__":
    main()
