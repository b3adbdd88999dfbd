"""Partial-label losses: marginal cross-entropy and a soft Dice over the annotated classes.

3D-IRCADb-01 annotates kidneys in only 6 of its 20 patients. Plain cross-entropy on the merged
class map would teach the network that the other patients' kidneys are background. The marginal
cross-entropy instead scores a pixel by the log of the total probability of the classes it may
belong to: an annotated pixel of class ``c`` costs ``-log p_c`` as usual, a background pixel of a
patient without kidney masks costs ``-log (p_background + p_kidney)``. Fully annotated patients get
exactly the standard softmax cross-entropy of the paper. (Shi et al., "Marginal loss and
exclusion loss for partially supervised multi-organ segmentation", MedIA 2021.)

The soft Dice term complements it where cross-entropy is weak: small structures (kidneys, thin
bone) that few pixels of a slice hold. MONAI's ``DiceCELoss`` cannot leave a class out for some
samples of a batch only; :class:`PartialLabelDiceCELoss` computes the Dice of each foreground class
over the samples that annotate it, pooled over the batch (so slices without the organ do not make
the score unstable), and averages over the classes that are annotated somewhere in the batch.

The admissible classes come packed in the target by :class:`liver_fcn.transforms.EncodePartialLabeld`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PartialLabelCrossEntropyLoss", "PartialLabelDiceCELoss", "admissible_mask", "annotated_classes"]


def _flat_target(target: torch.Tensor) -> torch.Tensor:
    if target.ndim >= 2 and target.shape[1] == 1:
        target = target[:, 0]
    return target.long()


def admissible_mask(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean ``(N, C, *spatial)`` mask of the classes each pixel may belong to."""
    target = _flat_target(target)
    cls, missing = target % num_classes, target // num_classes
    classes = torch.arange(num_classes, device=target.device).view(1, -1, *([1] * (target.ndim - 1)))
    allowed = cls.unsqueeze(1) == classes
    maybe = ((missing.unsqueeze(1) >> classes) & 1).bool() & (cls.unsqueeze(1) == 0)
    return allowed | maybe


def annotated_classes(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean ``(N, C)``: which classes each sample's label annotates (background always).

    A class is not annotated for a sample when any of its background pixels carries that class in
    its bitmask of possible classes (see :class:`~liver_fcn.transforms.EncodePartialLabeld`).
    """
    target = _flat_target(target)
    missing = (target // num_classes).flatten(1)  # (N, pixels) bitmasks
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1)
    return ~((missing.unsqueeze(1) >> classes) & 1).bool().any(-1)


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


class PartialLabelDiceCELoss(nn.Module):
    """Marginal cross-entropy plus ``dice_weight`` times a soft Dice loss over the annotated classes.

    The Dice of foreground class ``c`` is ``2 sum(p_c y_c) / (sum p_c + sum y_c)`` over all pixels of
    the samples that annotate ``c`` (batch-pooled, ``smooth`` added to both terms); the loss is one
    minus its mean over the classes annotated by at least one sample. ``dice_weight=0`` is the
    cross-entropy alone.

    Args:
        num_classes: number of classes C of the network output (background included).
        dice_weight: weight of the Dice term.
        smooth: added to numerator and denominator.
    """

    def __init__(self, num_classes: int = 4, dice_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight}")
        self.num_classes, self.dice_weight, self.smooth = num_classes, float(dice_weight), float(smooth)
        self.ce = PartialLabelCrossEntropyLoss(num_classes)

    def __str__(self) -> str:
        dice = f" + {self.dice_weight:g} x partial-label soft Dice" if self.dice_weight else ""
        return "partial-label cross-entropy" + dice

    def dice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        flat = _flat_target(target)
        cls = flat % self.num_classes
        onehot = torch.nn.functional.one_hot(cls, self.num_classes).movedim(-1, 1).to(probs.dtype)
        annotated = annotated_classes(flat, self.num_classes).to(probs.dtype)  # (N, C)
        dims = tuple(range(2, probs.ndim))
        inter = (probs * onehot).sum(dims) * annotated  # (N, C)
        denom = (probs.sum(dims) + onehot.sum(dims)) * annotated
        inter, denom = inter[:, 1:].sum(0), denom[:, 1:].sum(0)
        present = annotated[:, 1:].sum(0) > 0
        if not present.any():
            return logits.sum() * 0.0
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        return 1.0 - dice[present].mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits, target)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice_loss(logits, target)
        return loss
