"""The best checkpoint's prediction on a validation patient, drawn when training ends."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events

from liver_fcn import CLASS_NAMES
from liver_fcn.checkpoint import load_model_state
from liver_fcn.visualize import overlay_montage

__all__ = ["ValidationOverlay"]


class ValidationOverlay:
    """At the end of training, draw the best checkpoint's prediction on a validation patient
    (``<output_path>``), for the run's MLflow artifacts.

    Loads ``checkpoint``'s weights into ``network_def`` (the network ``network`` runs, unwrapped from
    DistributedDataParallel), so attach it after the checkpoint savers. Does nothing without a
    validation patient or a checkpoint.
    """

    def __init__(
        self,
        dataset,
        network_def,
        network,
        inferer,
        checkpoint: str | os.PathLike,
        output_path: str | os.PathLike,
        class_names: Sequence[str] = CLASS_NAMES,
        case: int = 0,
    ) -> None:
        self.dataset, self.network_def, self.network, self.inferer = dataset, network_def, network, inferer
        self.checkpoint, self.output_path = Path(checkpoint), Path(output_path)
        self.class_names, self.case = list(class_names), int(case)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None) -> Path | None:
        if len(self.dataset) <= self.case or not self.checkpoint.is_file():
            return None
        state, _ = load_model_state(self.checkpoint)
        self.network_def.load_state_dict(state)
        device = next(self.network_def.parameters()).device
        item = self.dataset[self.case]
        self.network.eval()
        with torch.no_grad():
            logits = self.inferer(item["image"][None].to(device), self.network)
        pred = np.asarray(logits.argmax(1)[0].cpu())
        return overlay_montage(
            np.asarray(item["image"][0].cpu()),
            self.output_path,
            pred=pred,
            truth=np.asarray(item["label"][0].cpu()),
            class_names=self.class_names,
            title=f"{item.get('patient', 'validation')}: best checkpoint, prediction and reference",
        )
