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
    """

    def __init__(self, out_channels: int = 4, threshold: float = 0.05) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.threshold = nn.Parameter(torch.tensor(float(threshold)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1]
        liver = 40.0 * (x - self.threshold)
        others = torch.full_like(x, -40.0).repeat(1, self.out_channels - 2, 1, 1)
        return torch.cat([torch.zeros_like(x), liver, others], dim=1)


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
