"""How each patient's organ masks were drawn: the conventions a cross-validation score depends on.

3D-IRCADb-01's masks were drawn by hand, patient by patient, and not all the same way. A model that
learns one patient's convention is scored against another's, and no training can close that gap.
For every patient of a prepared data set (CT and masks) and, with ``--masks``, every mask-only
patient (the folder ``liver-fcn synth`` and ``warp`` read), this prints:

- bone, ``filled``: the mask's share of itself with its holes filled slice by slice (1.0: whole bones
  drawn, marrow included; about 0.8: the dense shell and trabeculae only);
- bone, ``< 150 HU``: the share of the mask below 150 HU (a mask drawn with a margin of soft tissue
  around the bone has a large share), and the median HU of the mask's inner rim (one pixel deep);
- bone, ``threshold``: the HU threshold whose bright voxels, within 3 pixels of the mask, best match
  it (IoU; each hole-filled too): the threshold the mask was drawn at, near enough;
- kidney and liver: the median HU inside the mask (contrast phase and timing).

With CT the bone columns need the CT; mask-only patients get the ``filled`` share alone. Prints a
table; asserts nothing.

    python benchmarks/label_conventions.py --dataset_dir data/ircadb [--masks /path/to/ircadb-masks]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from liver_fcn.data.ct import load_ct  # noqa: E402
from liver_fcn.data.synth import _patient_masks, _read_masks, find_mask_patients  # noqa: E402
from liver_fcn.transforms import fill_holes_slicewise  # noqa: E402

THRESHOLDS = (100, 150, 200, 250, 300)
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)  # a 2D cross in the (X, Y) plane of (X, Y, Z) arrays
IN_PLANE[:, 1, 1] = IN_PLANE[1, :, 1] = True


def filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` (X, Y, Z) with its holes filled axial slice by axial slice."""
    return fill_holes_slicewise(mask.astype(np.uint8), (1,), axis=-1) == 1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else float("nan")


def organ(organs: dict[str, np.ndarray], *names: str) -> np.ndarray | None:
    """The union of the organ masks named (absent ones skipped), or None when none is there."""
    found = [organs[n] for n in names if n in organs]
    return np.logical_or.reduce(found) if found else None


def bone_row(bone: np.ndarray, ct: np.ndarray | None) -> dict:
    row = {"bone_filled": np.count_nonzero(bone) / max(np.count_nonzero(filled(bone)), 1)}
    if ct is None:
        return row
    rim = bone & ~ndimage.binary_erosion(bone, IN_PLANE)
    near = ndimage.binary_dilation(bone, IN_PLANE, iterations=3)
    fits = {}
    for t in THRESHOLDS:
        bright = (ct > t) & near
        fits[t] = max((iou(bone, bright), "plain"), (iou(bone, filled(bright)), "filled"))
    best = max(fits, key=lambda t: fits[t][0])
    row.update(
        bone_below_150=float(np.mean(ct[bone] < 150)),
        bone_rim_hu=float(np.median(ct[rim])),
        bone_threshold=f"{best} HU {fits[best][1]} (IoU {fits[best][0]:.2f})",
    )
    return row


def describe(name: str, organs: dict[str, np.ndarray], ct: np.ndarray | None) -> dict:
    row: dict = {"patient": name, "ct": ct is not None}
    bone = organ(organs, "bone")
    if bone is not None and bone.any():
        row.update(bone_row(bone, ct))
    if ct is not None:
        for label, names in (("liver", ("liver",)), ("kidney", ("leftkidney", "rightkidney", "kidneys", "kidney"))):
            mask = organ(organs, *names)
            if mask is not None and mask.any():
                row[f"{label}_hu"] = float(np.median(ct[mask]))
    return row


def real_patients(dataset_dir: Path):
    datalist = json.loads((dataset_dir / "datalist.json").read_text())
    seen = set()
    for item in [i for key in ("training", "validation", "test") for i in datalist.get(key, [])]:
        if item["patient"] in seen or "masks" not in item:
            continue
        seen.add(item["patient"])
        ct = np.asarray(load_ct(dataset_dir / item["image"])[0], dtype=np.float32)
        first = Path(next(iter(item["masks"].values()))[0])
        organs, _ = _read_masks(dataset_dir / first.parent)
        if next(iter(organs.values())).shape != ct.shape:
            raise SystemExit(f"{dataset_dir / first.parent}: masks are not on the CT's grid")
        yield item["patient"], organs, ct


def mask_patients(root: Path):
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in find_mask_patients(root):
            _, organs, _ = _patient_masks(name, src, Path(tmp))
            yield name, organs, None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, help="a liver-fcn prepare folder (CT and masks)")
    ap.add_argument("--masks", type=Path, help="a folder of mask-only patients (as liver-fcn synth reads)")
    args = ap.parse_args(argv)
    if args.dataset_dir is None and args.masks is None:
        ap.error("give --dataset_dir, --masks or both")
    sources = []
    if args.dataset_dir is not None:
        sources.append(real_patients(args.dataset_dir))
    if args.masks is not None:
        sources.append(mask_patients(args.masks))
    print(
        "| patient | CT | bone: share of filled | bone: share < 150 HU | bone: rim median HU | bone: drawn at "
        "| liver median HU | kidney median HU |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
        value = row.get(key)
        return "-" if value is None else value if isinstance(value, str) else fmt.format(value)

    for source in sources:
        for name, organs, ct in source:
            row = describe(name, organs, ct)
            print(
                f"| {name} | {'yes' if row['ct'] else 'masks only'} | {cell(row, 'bone_filled', '{:.3f}')} "
                f"| {cell(row, 'bone_below_150')} | {cell(row, 'bone_rim_hu', '{:.0f}')} "
                f"| {cell(row, 'bone_threshold')} "
                f"| {cell(row, 'liver_hu', '{:.0f}')} | {cell(row, 'kidney_hu', '{:.0f}')} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
