"""Predictions back onto the input's own grid, from the two affines, chunk by chunk."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from liver_fcn.transforms.utils import as_numpy

__all__ = ["ResampleToInputd", "class_map_on_input_grid"]


def _axis_map(pre_affine, in_affine, tol: float = 1e-3):
    """For each axis of the network's grid: the input axis it runs along, and the scale and offset
    mapping input voxel indices onto it (``pre = scale * input + offset``), from the two affines."""
    pre, inp = as_numpy(pre_affine, np.float64), as_numpy(in_affine, np.float64)
    m = np.linalg.solve(pre, inp)  # input voxel -> network-grid voxel
    axes, scales, offsets = [], [], []
    for a in range(3):
        row = m[a, :3]
        i = int(np.argmax(np.abs(row)))
        if abs(row[i]) < 1e-9 or np.any(np.abs(np.delete(row, i)) > tol * abs(row[i])):
            raise ValueError("the network's grid is not an axis-aligned resampling of the input grid")
        axes.append(i)
        scales.append(float(row[i]))
        offsets.append(float(m[a, 3]))
    if sorted(axes) != [0, 1, 2]:
        raise ValueError("the network's grid is not an axis-aligned resampling of the input grid")
    return axes, scales, offsets


def _lerp_along(t: torch.Tensor, coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation of ``t`` along ``dim`` at fractional indices ``coords``; zero outside.
    Whole indices inside (the input's own slices, as the pipeline keeps them) are picked, not mixed:
    a view where they run in steps of one."""
    size = t.shape[dim]
    valid = (coords > -0.5) & (coords < size - 0.5)  # half a voxel beyond the end voxels: edge value
    whole = torch.round(coords)
    if bool(valid.all()) and bool(((coords - whole).abs() < 1e-6).all()):
        idx = whole.long().clamp(0, size - 1)
        if bool((idx.diff() == 1).all()):
            return t.narrow(dim, int(idx[0]), idx.numel())
        return t.index_select(dim, idx.to(t.device))
    c = coords.clamp(0, size - 1)
    lo = torch.floor(c).long()
    hi = (lo + 1).clamp(max=size - 1)
    w = (c - lo).to(t.dtype)
    shape = [1] * t.ndim
    shape[dim] = -1
    a, b = t.index_select(dim, lo.to(t.device)), t.index_select(dim, hi.to(t.device))
    out = torch.lerp(a, b, w.view(shape).to(t.device))
    if bool(valid.all()):
        return out
    return out * valid.view(shape).to(device=t.device, dtype=t.dtype)


def _argmax_with_background(prob: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over [1 - sum(prob), *prob] along dim 0, by running comparisons (an argmax over
    the leading dimension of a large tensor is many times slower on the CPU)."""
    best = 1.0 - prob.sum(dim=0)
    labels = torch.zeros(prob.shape[1:], dtype=torch.uint8, device=prob.device)
    for c in range(prob.shape[0]):
        better = prob[c] > best
        labels.masked_fill_(better, c + 1)
        best = torch.maximum(best, prob[c])
    return labels


def _span(coords: torch.Tensor, size: int) -> tuple[int, int]:
    """First and one-past-last index whose coordinate lies on a grid of ``size`` voxels ((0, 0): none)."""
    inside = torch.nonzero((coords > -0.5) & (coords < size - 0.5)).flatten()
    return (int(inside.min()), int(inside.max()) + 1) if inside.numel() else (0, 0)


def _foreground_rows(prob: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> tuple | None:
    """The ranges of output rows and columns (indices into ``xs``, ``ys``: their coordinates on the
    network's grid) that can come out as foreground when the foreground probabilities ``prob``
    (C-1, X', Y', k) are interpolated bilinearly: those with a network pixel of foreground above
    one half (background below it) among their neighbours. Elsewhere every interpolated background
    probability is at least one half, which no foreground class beats. None: no such pixel."""
    maybe = (prob.sum(dim=0) > 0.5 - 1e-4).any(dim=-1)  # (X', Y'), a hair wider than the exact test
    if not bool(maybe.any()):
        return None
    spans = []
    for axis, c in ((0, xs), (1, ys)):
        hit = torch.nonzero(maybe.any(dim=1 - axis)).flatten()
        lo, hi = int(hit.min()), int(hit.max())
        near = torch.nonzero((c > lo - 1) & (c < hi + 1)).flatten()
        if not near.numel():
            return None
        spans.append((int(near.min()), int(near.max()) + 1))
    return tuple(spans)


def _entropy_sums(fg: torch.Tensor, h_sum: torch.Tensor, h_count: torch.Tensor) -> None:
    """Add, per class label, the entropy (nats) of the class probabilities and the voxel count, given
    the foreground probabilities ``fg`` (C-1, ...); background is one minus their sum. Only the
    foreground labels' sums are read, so the entropy is computed where the label is not background."""
    fg = fg.clamp_min(0)
    lab = _argmax_with_background(fg)
    where = lab > 0
    fg, lab = fg[:, where], lab[where].long()
    bg = (1.0 - fg.sum(0)).clamp_min(0)
    h = -torch.special.xlogy(bg, bg) - torch.special.xlogy(fg, fg).sum(0)
    h_sum += torch.bincount(lab, weights=h.double(), minlength=h_sum.numel()).to(h_sum)
    h_count += torch.bincount(lab, minlength=h_count.numel()).to(h_count)


def class_map_on_input_grid(
    logits: torch.Tensor,
    pre_affine,
    in_affine,
    in_shape: Sequence[int],
    chunk: int = 16,
    entropy: dict | None = None,
) -> torch.Tensor:
    """The class map (uint8, ``in_shape``) of network logits ``(C, X', Y', Z')``, brought back onto
    the input's grid from the two affines, without ever holding the full-resolution probabilities.

    Chunk by chunk along the slice axis: softmax, the foreground probabilities linearly
    interpolated onto the input voxels (background is one minus their sum, so whatever lies outside
    the network's grid is background), argmax. The network's grid must be an axis-aligned
    resampling of the input grid (orientation, in-plane spacing, crops and pads), as the pipeline's
    geometry makes it; in-plane work is confined to the part of the input that the grid covers.
    Runs on the logits' device.

    ``entropy``: a dict that receives, for each class c >= 1 found, the mean normalised entropy of the
    class probabilities (0: certain, 1: uniform over the classes) over the voxels labelled c - how
    sure the network was inside what it segmented. It is measured on the network's own in-plane
    pixels (those whose centres lie on the input) at the input's slices: the network's resolution,
    not its interpolation onto the input's finer pixels, which would cost several times the map.
    """
    axes, scales, offsets = _axis_map(pre_affine, in_affine)
    n_classes = logits.shape[0]
    h_sum = torch.zeros(n_classes, dtype=torch.float64, device=logits.device)
    h_count = torch.zeros(n_classes, dtype=torch.float64, device=logits.device)
    out_shape = [int(in_shape[i]) for i in axes]  # the input grid, in the network grid's axis order
    dev = logits.device
    coords = [torch.arange(n, dtype=torch.float64) * s + o for n, s, o in zip(out_shape, scales, offsets)]
    out = torch.zeros(out_shape, dtype=torch.uint8, device=dev)
    # in-plane: the input rows and columns the network's grid covers, and the network's pixels whose
    # centres lie on the input (where the entropy is measured)
    (x0, x1), (y0, y1) = (_span(coords[a], logits.shape[a + 1]) for a in range(2))
    (u0, u1), (v0, v1) = (
        _span((torch.arange(logits.shape[a + 1], dtype=torch.float64) - offsets[a]) / scales[a], out_shape[a])
        for a in range(2)
    )
    zc = coords[2]
    if x1 > x0 and y1 > y0:
        # in-plane sampling grid for grid_sample (align_corners: -1 and 1 are the end voxels' centres;
        # "border": the half voxel beyond them takes the end value), the same for every slice
        gx = (coords[0][x0:x1] / max(logits.shape[1] - 1, 1) * 2 - 1).float()
        gy = (coords[1][y0:y1] / max(logits.shape[2] - 1, 1) * 2 - 1).float()
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="xy"), dim=-1)[None].to(dev)  # (1, x, y, 2): (W=y, H=x)
        for k0 in range(0, out_shape[2], chunk):
            zs = zc[k0 : k0 + chunk]
            if not bool(((zs > -0.5) & (zs < logits.shape[3] - 0.5)).any()):
                continue
            lo = int(torch.floor(zs.clamp(0, logits.shape[3] - 1)).min())
            hi = min(int(torch.ceil(zs.clamp(0, logits.shape[3] - 1)).max()) + 1, logits.shape[3])
            prob = torch.softmax(logits[..., lo:hi].float(), dim=0)[1:]  # foreground, (C-1, X', Y', z)
            prob = _lerp_along(prob, zs - lo, 3)  # (C-1, X', Y', k) on the input's slices
            if entropy is not None and u1 > u0 and v1 > v0:
                _entropy_sums(prob[:, u0:u1, v0:v1], h_sum, h_count)
            # only where some network pixel of these slices is more likely foreground than background
            # can an input voxel be (bilinear weights are convex): the rest stays background
            rows = _foreground_rows(prob, coords[0][x0:x1], coords[1][y0:y1])
            if rows is None:
                continue
            (i0, i1), (j0, j1) = rows
            prob = prob.permute(3, 0, 1, 2).contiguous()  # slices as the batch of a 2D resampling
            sub = grid[:, i0:i1, j0:j1].expand(prob.shape[0], -1, -1, -1)
            prob = F.grid_sample(prob, sub, mode="bilinear", padding_mode="border", align_corners=True)
            labels = _argmax_with_background(prob.transpose(0, 1))  # (k, x, y)
            out[x0 + i0 : x0 + i1, y0 + j0 : y0 + j1, k0 : k0 + chunk] = labels.permute(1, 2, 0)
    if entropy is not None:
        for c in range(1, n_classes):
            if h_count[c] > 0:
                entropy[c] = float(h_sum[c] / h_count[c] / math.log(n_classes))
    inverse = [axes.index(i) for i in range(3)]
    return out.permute(*inverse).contiguous()


class ResampleToInputd(MapTransform):
    """Network logits on the network's grid -> the uint8 class map on the input's own grid.

    ``keys`` hold the logits ``(C, X', Y', Z')``; ``image_key`` the network's input (its affine is the
    network grid's); ``ref_key`` the image as loaded (its affine and shape are the input grid's).
    The result is a ``(1, X, Y, Z)`` uint8 MetaTensor on the CPU with the input's affine, made chunk
    by chunk by :func:`class_map_on_input_grid` on the logits' device (the GPU's, on a GPU). It
    replaces softmax + ``Invertd`` + argmax, which hold the full-resolution float probabilities of
    every class.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str = "image",
        ref_key: str = "ct",
        chunk: int = 16,
        entropy_key: str | None = "entropy",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.ref_key, self.chunk, self.entropy_key = image_key, ref_key, int(chunk), entropy_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        ref, img = d[self.ref_key], d[self.image_key]
        for key in self.key_iterator(d):
            entropy: dict | None = {} if self.entropy_key else None
            labels = class_map_on_input_grid(d[key], img.affine, ref.affine, ref.shape[1:], self.chunk, entropy)
            if self.entropy_key:
                d[self.entropy_key] = entropy  # {class index: mean normalised entropy inside it}
            meta = {k: v for k, v in ref.meta.items() if k != "affine"}
            # the uint8 map goes to the CPU for the post-processing (connected components, holes)
            d[key] = MetaTensor(labels[None].cpu(), affine=ref.affine.clone(), meta=meta)
        return d
