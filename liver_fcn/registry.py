"""The trained model in MLflow's Model Registry.

At the end of a training run the best checkpoint is logged as an MLflow model - a ``pyfunc`` whose
artifacts are the checkpoint (weights and settings), the inference config and the shared
preprocessing chain, with a tensor signature and an input example - and registered as a new version
of a registered model (``liver-fcn`` by default). ``liver-fcn compare --promote ALIAS`` points an
alias at the version of the best run; inference then takes ``--checkpoint models:/NAME@ALIAS`` (or
``models:/NAME/VERSION``) from any tracking store, local or a server.

The pyfunc's ``predict`` takes preprocessed slices, ``(N, C, H, W)`` float32 as the bundle's
preprocessing makes them, and returns their class maps ``(N, H, W)`` uint8; whole CTs go through
``python -m monai.bundle run inference``.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import torch

import liver_fcn
from liver_fcn.bundle import bundle_folder
from liver_fcn.checkpoint import checkpoint_settings, download_checkpoint, load_model, network_from_settings
from liver_fcn.errors import InputError, reported

__all__ = ["FCNModel", "download_checkpoint", "fluent_tracking", "log_model", "promote"]

#: the bundle's files stored with each logged model
BUNDLE_FILES = ("inference.json", "pipeline.json", "metadata.json")


with warnings.catch_warnings():  # MLflow asks for type hints it could check; the signature below says it all
    warnings.filterwarnings("ignore", message=".*type hints.*")

    class FCNModel(mlflow.pyfunc.PythonModel):
        """Preprocessed slices in, class maps out (see the module docstring)."""

        def load_context(self, context) -> None:
            ckpt = context.artifacts["checkpoint"]
            self.net = load_model(ckpt, network_from_settings(checkpoint_settings(ckpt)))

        def predict(self, context, model_input, params=None):
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            with torch.no_grad():
                return self.net(x).argmax(1).to(torch.uint8).numpy()


@contextmanager
def fluent_tracking(uri: str):
    """MLflow's fluent API (and ``MLFLOW_TRACKING_URI``, which it sets for subprocesses) pointed at
    ``uri`` inside the block, as they were after it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def log_model(
    tracking_uri: str,
    run_id: str,
    checkpoint: str | os.PathLike,
    registered_name: str | None = "liver-fcn",
    configs_dir: str | os.PathLike | None = None,
):
    """Log ``checkpoint`` as the MLflow model ``model`` of run ``run_id`` and, with
    ``registered_name``, register it as a new version of that name. Returns the model info.

    The run is resumed through MLflow's fluent API (``log_model`` logs into the active run), pointed
    at ``tracking_uri`` for the call only. The model carries the bundle configs of ``configs_dir``
    (default: the source checkout's bundle)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    settings = checkpoint_settings(checkpoint)
    example = np.full((1, int(settings["in_channels"]), 64, 64), -float(settings["intensity_mean"]), dtype=np.float32)
    # any number of slices of any size (the network pads to a multiple of 32 and crops back)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(settings["in_channels"]), -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
    )
    configs_dir = Path(configs_dir) if configs_dir is not None else bundle_folder() / "configs"
    artifacts = {"checkpoint": str(checkpoint)}
    artifacts.update({Path(f).stem: str(configs_dir / f) for f in BUNDLE_FILES if (configs_dir / f).is_file()})
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"liver-fcn=={liver_fcn.__version__}"]
    with fluent_tracking(tracking_uri), mlflow.start_run(run_id=run_id):
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=FCNModel(),
            artifacts=artifacts,
            signature=signature,
            input_example=example,
            registered_model_name=registered_name or None,
            pip_requirements=requirements,
            metadata={"settings": {k: v for k, v in settings.items() if k not in ("run_name", "experiment_name")}},
        )


@reported
def promote(tracking_uri: str, name: str, alias: str, run_id: str):
    """Point ``alias`` of registered model ``name`` at the version logged by run ``run_id``; returns it."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        raise InputError(
            f"{tracking_uri}: run {run_id} has no version of registered model {name!r} (trained with registration off?)"
        )
    version = max(versions, key=lambda v: int(v.version))
    client.set_registered_model_alias(name, alias, version.version)
    return version
