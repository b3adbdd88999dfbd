"""Marginal (partial-label) cross-entropy.

3D-IRCADb-01 annotates kidneys in only 6 of its 20 patients. Plain cross-entropy on the merged
class map would teach the network that the other patients' kidneys are background. The marginal
cross-entropy instead scores a pixel by the log of the total probability of the classes it may
belong to: an annotated pixel of class ``c`` costs ``-log p_c`` as usual, a background pixel of a
patient without kidney masks costs ``-log (p_background + p_kidney)``. Fully annotated patients get
exactly the standard softmax cross-entropy of the paper. (Shi et al., "Marginal loss and
exclusion loss for partially supervised multi-organ segmentation", MedIA 2021.)

The admissible classes come packed in the target by :class:`liver_fcn.transforms.EncodePartialLabeld`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PartialLabelCrossEntropyLoss", "admissible_mask"]


def admissible_mask(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean ``(N, C, *spatial)`` mask of the classes each pixel may belong to."""
    if target.ndim >= 2 and target.shape[1] == 1:
        target = target[:, 0]
    target = target.long()
    cls, missing = target % num_classes, target // num_classes
    classes = torch.arange(num_classes, device=target.device).view(1, -1, *([1] * (target.ndim - 1)))
    allowed = cls.unsqueeze(1) == classes
    maybe = ((missing.unsqueeze(1) >> classes) & 1).bool() & (cls.unsqueeze(1) == 0)
    return allowed | maybe


class PartialLabelCrossEntropyLoss(nn.Module):
    """Cross-entropy over the set of admissible classes of each pixel.

    Args:
        num_classes: number of classes C of the network output (background included).
        reduction: ``"mean"`` over pixels (default), ``"sum"`` or ``"none"``.

    ``forward(logits (N, C, H, W), target (N, 1, H, W) or (N, H, W))``, target encoded as ``c + C * m``.
    """

    def __init__(self, num_classes: int = 4, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
        self.num_classes, self.reduction = num_classes, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels, expected {self.num_classes}")
        log_p = torch.log_softmax(logits.float(), dim=1)
        allowed = admissible_mask(target, self.num_classes)
        loss = -torch.logsumexp(log_p.masked_fill(~allowed, float("-inf")), dim=1)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
