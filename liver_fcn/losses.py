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
    # class index and bitmask fit in 32 bits for any class count this loss can handle; the bitwise
    # work over (N, C, H, W) is several times cheaper than in int64
    return target.to(torch.int32) if target.dtype != torch.int32 else target


def _split(target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The class index (N, *spatial), the bitmask of classes a pixel may also be, and the classes
    ``arange(C)`` shaped to broadcast over a class dimension at 1."""
    target = _flat_target(target)
    classes = torch.arange(num_classes, dtype=torch.int32, device=target.device).view(1, -1, *([1] * (target.ndim - 1)))
    return target % num_classes, target // num_classes, classes


def admissible_mask(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean ``(N, C, *spatial)`` mask of the classes each pixel may belong to."""
    return _admissible(*_split(target, num_classes))


def _admissible(cls: torch.Tensor, missing: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    allowed = cls.unsqueeze(1) == classes
    if bool(missing.any()):
        allowed |= ((missing.unsqueeze(1) >> classes) & 1).bool() & (cls.unsqueeze(1) == 0)
    return allowed


def annotated_classes(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean ``(N, C)``: which classes each sample's label annotates (background always).

    A class is not annotated for a sample when any of its background pixels carries that class in
    its bitmask of possible classes (see :class:`~liver_fcn.transforms.EncodePartialLabeld`).
    """
    return _annotated(_flat_target(target) // num_classes, num_classes)


def _annotated(missing: torch.Tensor, num_classes: int) -> torch.Tensor:
    missing = missing.flatten(1)  # (N, pixels) bitmasks
    return torch.stack([~((missing >> c) & 1).bool().any(1) for c in range(num_classes)], 1)


def _log_probs(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class log-probabilities (float32) of logits that have ``num_classes`` channels."""
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} channels, expected {num_classes}")
    return torch.log_softmax(logits.float(), dim=1)


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
        parts = _split(target, self.num_classes)
        return self._reduce(self.pixel_loss(_log_probs(logits, self.num_classes), *parts))

    @staticmethod
    def pixel_loss(
        log_p: torch.Tensor, cls: torch.Tensor, missing: torch.Tensor, classes: torch.Tensor
    ) -> torch.Tensor:
        """-log of the total probability of each pixel's admissible classes, from log-probabilities
        and the target's parts (:func:`_split`)."""
        if not bool(missing.any()):  # every class annotated: the plain cross-entropy, one gather
            return -log_p.gather(1, cls.long().unsqueeze(1)).squeeze(1)
        allowed = _admissible(cls, missing, classes)
        return -torch.logsumexp(log_p.masked_fill(~allowed, float("-inf")), dim=1)

    def _reduce(self, loss: torch.Tensor) -> torch.Tensor:
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

    def dice_loss(self, logits: torch.Tensor, target: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        """The soft Dice term; ``probs``: the softmax of ``logits`` where the caller has it."""
        return self._dice(
            torch.softmax(logits.float(), dim=1) if probs is None else probs, *_split(target, self.num_classes)
        )

    def _dice(
        self, probs: torch.Tensor, cls: torch.Tensor, missing: torch.Tensor, classes: torch.Tensor
    ) -> torch.Tensor:
        onehot = (cls.unsqueeze(1) == classes).to(probs.dtype)
        annotated = _annotated(missing, self.num_classes).to(probs.dtype)  # (N, C)
        dims = tuple(range(2, probs.ndim))
        inter = (probs * onehot).sum(dims) * annotated  # (N, C)
        denom = (probs.sum(dims) + onehot.sum(dims)) * annotated
        inter, denom = inter[:, 1:].sum(0), denom[:, 1:].sum(0)
        present = annotated[:, 1:].sum(0) > 0
        if not present.any():
            return probs.sum() * 0.0
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        return 1.0 - dice[present].mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = _log_probs(logits, self.num_classes)  # shared by both terms, as is the target's split
        parts = _split(target, self.num_classes)
        loss = self.ce.pixel_loss(log_p, *parts).mean()
        if self.dice_weight:
            loss = loss + self.dice_weight * self._dice(log_p.exp(), *parts)
        return loss
