"""MONAI's :class:`~monai.inferers.SliceInferer` with a progress bar over the slices of a case."""

from __future__ import annotations

import sys
from typing import Any

import torch
from monai.inferers import SliceInferer
from tqdm import tqdm

from liver_fcn.options import show_progress

__all__ = ["SliceProgressInferer"]


class SliceProgressInferer(SliceInferer):
    """Runs the 2D network slice by slice as :class:`~monai.inferers.SliceInferer` does and, when
    ``progress`` is on (``"auto"``: stderr is a terminal), shows a transient bar of the case's slices
    under the run's bar of cases. ``progress`` off leaves SliceInferer's behaviour unchanged."""

    def __init__(self, spatial_dim: int = 2, *args: Any, progress: bool | str = "auto", **kwargs: Any) -> None:
        super().__init__(spatial_dim, *args, **kwargs)
        self.show = show_progress(progress)

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any):
        if not self.show:
            return super().__call__(inputs, network, *args, **kwargs)
        slices = int(inputs.shape[2 + self.spatial_dim]) * int(inputs.shape[0])
        with tqdm(total=slices, desc="slices", unit="slice", leave=False, file=sys.stderr) as bar:

            def counted(x: torch.Tensor, *a: Any, **k: Any):
                out = network(x, *a, **k)
                bar.update(int(x.shape[0]))
                return out

            return super().__call__(inputs, counted, *args, **kwargs)
