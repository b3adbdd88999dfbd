"""The trained model in MLflow's Model Registry.

At the end of a training run the best checkpoint is logged as an MLflow model - a ``pyfunc`` whose
artifacts are the checkpoint (weights and settings), the inference config and the shared
preprocessing chain, with a signature - and registered as a new version of a registered model
(``liver-fcn`` by default). ``liver-fcn compare --promote ALIAS`` points an alias at the version of the
best run; inference then takes ``--checkpoint models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) from
any tracking store, local or a server.

The pyfunc (:class:`CTModel`) takes what a user has: a table with a column ``ct``, one CT per row (a
NIfTI file, a DICOM folder or a zip of one, a path on the machine that runs the model), and runs
each through the bundle's inference (:func:`liver_fcn.api.run_inference`, the code of ``python -m
monai.bundle run inference``); it returns a row per CT with the mask's path, the report's path, the
volume of each class in mL, the QC flags and the error of a CT that failed. Parameters:
``output_dir`` (where the files go; a new temporary folder by default, left for the caller),
``series`` (a SeriesInstanceUID or ``auto`` for inputs holding several series), ``device``,
``precision``, ``overlay``, ``dicom_seg`` and ``rtstruct``. ``mlflow models predict`` and ``mlflow models
serve`` run it.

:class:`FCNModel`, the slice-level model (preprocessed slices ``(N, C, H, W)`` float32 in, class maps
``(N, H, W)`` uint8 out), is what ``log_model(kind="slices")`` logs and what models logged by
liver-fcn 0.7 and earlier load as.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

import liver_fcn
from liver_fcn.api import run_inference
from liver_fcn.bundle import bundle_folder
from liver_fcn.checkpoint import checkpoint_settings, download_checkpoint, load_model, network_from_settings
from liver_fcn.errors import InputError, reported
from liver_fcn.inference.cases import case_name

__all__ = ["CT_PARAMS", "CTModel", "FCNModel", "download_checkpoint", "fluent_tracking", "log_model", "promote"]

#: the bundle's files stored with each logged model
BUNDLE_FILES = ("inference.json", "pipeline.json", "metadata.json")


class FCNModel(mlflow.pyfunc.PythonModel):
    """Preprocessed slices in, class maps out (see the module docstring)."""

    def load_context(self, context) -> None:
        ckpt = context.artifacts["checkpoint"]
        self.net = load_model(ckpt, network_from_settings(checkpoint_settings(ckpt)))

    def predict(self, context, model_input: np.ndarray, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.net(x).argmax(1).to(torch.uint8).numpy()


class CTModel(mlflow.pyfunc.PythonModel):
    """A CT path per row in, its mask and report out (see the module docstring)."""

    def load_context(self, context) -> None:
        self.checkpoint = context.artifacts["checkpoint"]
        self.class_names = list(checkpoint_settings(self.checkpoint)["class_names"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return segment_table(_ct_paths(model_input), self.checkpoint, self.class_names, params)


#: the CT model's parameters and their defaults
CT_PARAMS = {
    "output_dir": "",
    "series": "",
    "device": "auto",
    "precision": "auto",
    "overlay": False,
    "dicom_seg": False,
    "rtstruct": False,
}


def _ct_paths(model_input) -> list[str]:
    if isinstance(model_input, (str, os.PathLike)):
        return [os.fspath(model_input)]
    if isinstance(model_input, dict):
        model_input = model_input.get("ct", [])
    elif hasattr(model_input, "columns"):  # a pandas DataFrame
        if "ct" not in model_input.columns:
            raise InputError(f"model input has columns {list(model_input.columns)}; expected a column 'ct'")
        model_input = model_input["ct"]
    return [str(p) for p in (model_input if isinstance(model_input, (list, tuple)) else list(model_input))]


def segment_table(paths: list[str], checkpoint, class_names: list[str], params: dict | None = None):
    """Run the bundle's inference on ``paths`` and return one row per path (a pandas DataFrame, in
    the order of ``paths``): ``ct``, ``case``, ``mask``, ``report``, ``<class>_ml``, ``qc_flags``, ``error``."""
    params = {**CT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    unknown = set(params) - set(CT_PARAMS)
    if unknown:
        raise InputError(f"unknown parameters {sorted(unknown)}; the model takes {sorted(CT_PARAMS)}")
    if not paths:
        raise InputError("model input holds no CT paths")
    out = Path(params["output_dir"] or tempfile.mkdtemp(prefix="liver-fcn-predict-")).absolute()
    names = [case_name(Path(p)) for p in paths]
    if len(set(names)) < len(names):  # same file names in several folders: number the cases
        names = [f"{i:03d}_{n}" for i, n in enumerate(names, 1)]
    options = {k: params[k] for k in ("overlay", "dicom_seg", "rtstruct", "precision")}
    if params["series"]:
        options["series_uid"] = str(params["series"])
    with tempfile.TemporaryDirectory(prefix="liver-fcn-predict-list-") as tmp:
        datalist = Path(tmp) / "datalist.json"
        entries = [{"image": str(Path(p).absolute()), "patient": n} for p, n in zip(paths, names)]
        datalist.write_text(json.dumps(entries))
        try:
            summary = run_inference(
                datalist, out, checkpoint=checkpoint, device=str(params["device"]), quiet=True, **options
            )
        except SystemExit:  # a case failed after its checks: the summary names it, the others are written
            summary = json.loads((out / "summary.json").read_text())
    rows = {}
    for w in summary["written"]:
        report_path = out / f"{w['case']}_report.json"
        report = json.loads(report_path.read_text())
        rows[w["case"]] = {
            "mask": w["files"]["mask"],
            "report": str(report_path),
            **{f"{c}_ml": float(report["volumes_ml"].get(c, 0.0)) for c in class_names[1:]},
            "qc_flags": "; ".join((report.get("qc") or {}).get("flags") or []),
            "error": "",
        }
    for f in summary["failed"]:
        rows[f["case"]] = {"error": f["error"]}
    columns = ["ct", "case", "mask", "report", *[f"{c}_ml" for c in class_names[1:]], "qc_flags", "error"]
    table = [{"ct": p, "case": n, **rows.get(n, {"error": "not run"})} for p, n in zip(paths, names)]
    return pd.DataFrame(table, columns=columns)


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


def _signature(settings: dict, kind: str):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    if kind == "slices":  # any number of slices of any size (the network pads to a multiple of 32 and crops back)
        return ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(settings["in_channels"]), -1, -1))]),
            outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        )
    volumes = [ColSpec("double", f"{c}_ml", required=False) for c in settings["class_names"][1:]]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "ct")]),
        outputs=Schema(
            [ColSpec("string", "ct"), ColSpec("string", "case")]
            + [ColSpec("string", k, required=False) for k in ("mask", "report")]
            + volumes
            + [ColSpec("string", "qc_flags", required=False), ColSpec("string", "error")]
        ),
        params=ParamSchema(
            [ParamSpec(k, "boolean" if isinstance(v, bool) else "string", v) for k, v in CT_PARAMS.items()]
        ),
    )


def log_model(
    tracking_uri: str,
    run_id: str,
    checkpoint: str | os.PathLike,
    registered_name: str | None = "liver-fcn",
    configs_dir: str | os.PathLike | None = None,
    kind: str = "ct",
):
    """Log ``checkpoint`` as the MLflow model ``model`` of run ``run_id`` and, with
    ``registered_name``, register it as a new version of that name. Returns the model info.

    ``kind`` ``"ct"`` logs :class:`CTModel` (a CT path per row in, masks and volumes out), ``"slices"``
    :class:`FCNModel` (preprocessed slices in, class maps out, with an input example). The run is
    resumed through MLflow's fluent API (``log_model`` logs into the active run), pointed at
    ``tracking_uri`` for the call only. The model carries the bundle configs of ``configs_dir``
    (default: the source checkout's bundle)."""
    if kind not in ("ct", "slices"):
        raise ValueError(f"kind {kind!r}: expected 'ct' or 'slices'")
    settings = checkpoint_settings(checkpoint)
    example = None
    if kind == "slices":
        example = np.full((1, int(settings["in_channels"]), 64, 64), -float(settings["intensity_mean"]), np.float32)
    configs_dir = Path(configs_dir) if configs_dir is not None else bundle_folder() / "configs"
    artifacts = {"checkpoint": str(checkpoint)}
    artifacts.update({Path(f).stem: str(configs_dir / f) for f in BUNDLE_FILES if (configs_dir / f).is_file()})
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"liver-fcn=={liver_fcn.__version__}"]
    with fluent_tracking(tracking_uri), mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # MLflow's advice to give an input example: a CT model's input is a path on the machine that
        # runs it, which no example can carry; the signature says what it takes
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=CTModel() if kind == "ct" else FCNModel(),
            artifacts=artifacts,
            signature=_signature(settings, kind),
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
