"""Test-only parts (a network, a faulty output step), importable by bundle subprocesses run from the
repository root."""

from __future__ import annotations

import torch
from torch import nn

from liver_fcn.inference import WriteOverlayd


class ThresholdNet(nn.Module):
    """Predicts "liver" where the preprocessed intensity exceeds a threshold, background elsewhere.

    With the bundle's preprocessing (HU window [-250, 450] -> [0, 1], minus 0.19), 100 HU becomes
    0.31 and air -0.19: a threshold of 0.05 separates them. Its output is known exactly, so the
    geometry of the inference chain (orientation, resizing and their inversion) can be checked.
    ``painted``: the class it predicts there instead of the liver.
    """

    def __init__(self, out_channels: int = 4, threshold: float = 0.05, painted: int = 1) -> None:
        super().__init__()
        self.out_channels, self.painted = out_channels, int(painted)
        self.threshold = nn.Parameter(torch.tensor(float(threshold)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1]
        scores = torch.full_like(x, -40.0).repeat(1, self.out_channels, 1, 1)
        scores[:, 0] = 0.0
        scores[:, self.painted] = 40.0 * (x[:, 0] - self.threshold)
        return scores


class OverlayFailingFor(WriteOverlayd):
    """The bundle's overlay step, failing for one ``case`` as a full disk or a killed writer would:
    after the case's mask is staged and before its set is committed."""

    def __init__(self, *args, case: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.case = case

    def write(self, d, seg, affine, path) -> None:
        if d.get("case") == self.case:
            raise OSError(28, "No space left on device (injected)", str(path))
        super().write(d, seg, affine, path)
