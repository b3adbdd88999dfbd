"""Several trained networks run as one: their class probabilities averaged."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Ensemble"]


class Ensemble(nn.Module):
    """The mean of the members' softmax probabilities, returned as log-probabilities.

    Every consumer of a network's output in this project takes a softmax or an argmax over the
    class axis (dim 1); ``log(mean p)`` keeps both exact: its softmax is the mean probability and its
    argmax is the class the averaged probabilities choose. The members must agree on the input they
    take and the classes they score (:func:`liver_fcn.checkpoint.checkpoint_settings` checks the
    settings that define them); their width and variant may differ.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one network")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for net in self.members:
            p = torch.softmax(net(x).float(), dim=1)
            total = p if total is None else total.add_(p)
        return total.div_(len(self.members)).clamp_min_(1e-12).log_()
