"""Which process of a distributed run this is."""

from __future__ import annotations

import torch

__all__ = ["is_rank0"]


def is_rank0() -> bool:
    """True in a single process and in the first process of a distributed run (torchrun)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
