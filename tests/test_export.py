"""The model leaving the project the standard ways: MONAI's ckpt_export / onnx_export, and MLflow's
Model Registry (log, register, promote, run inference from models:/ URIs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run

from liver_fcn.checkpoint import checkpoint_settings, load_model, network_from_settings

from .commands import warm_module
from .conftest import REPO
from .test_inference import SETTINGS, block_volume

CONFIGS = REPO / "bundle" / "configs"


def monai_bundle(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | (env or {})
    return warm_module("monai.bundle", *args, cwd=REPO, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small FCN-8s whose every layer has random weights (score layers too, so the class map varies)."""
    torch.manual_seed(0)
    net = network_from_settings(SETTINGS)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("export") / "model.pt"
    torch.save({"model": net.state_dict(), "settings": SETTINGS}, path)
    return path


def ckpt_export(checkpoint: Path, ts: Path) -> None:
    """The export command as the README gives it."""
    r = monai_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(ts),
        "--ckpt_file",
        str(checkpoint),
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--key_in_ckpt",
        "model",
        "--checkpoint",
        str(checkpoint),
    )
    assert r.returncode == 0, r.stderr[-3000:]


def eager(checkpoint: Path) -> torch.nn.Module:
    return load_model(checkpoint, network_from_settings(checkpoint_settings(checkpoint)))


def test_ckpt_export_gives_the_eager_output_and_carries_the_settings(checkpoint, tmp_path):
    ts = tmp_path / "model.ts"
    ckpt_export(checkpoint, ts)
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(ts), _extra_files=extra)
    assert b'"network_data_format"' in extra["metadata.json"] and b'"network_def"' in extra["inference.json"]
    x = torch.randn(2, 1, 96, 128) * 0.3
    with torch.no_grad():
        want, got = eager(checkpoint)(x), scripted(x)
    assert want.abs().max() > 0.1 and float((want - got).abs().max()) < 1e-4
    stored = checkpoint_settings(ts)
    assert {k: stored[k] for k in SETTINGS} == SETTINGS


def test_onnx_export_runs_in_onnx_runtime_at_any_size(checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    r = monai_bundle(
        "onnx_export",
        "--args_file",
        str(CONFIGS / "onnx_export.json"),
        "--filepath",
        str(path),
        "--ckpt_file",
        str(checkpoint),
        "--checkpoint",
        str(checkpoint),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    net = eager(checkpoint)
    for shape in [(1, 1, 64, 64), (3, 1, 96, 160), (2, 1, 70, 97)]:  # batch, height and width are free
        x = torch.randn(shape) * 0.3
        with torch.no_grad():
            want = net(x).numpy()
        (got,) = session.run(["pred"], {"image": x.numpy()})
        assert got.shape == want.shape and float(np.abs(got - want).max()) < 1e-3


def nifti_ct(tmp: Path) -> Path:
    ct, _ = block_volume()
    path = tmp / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(ct, (2, 1, 0)), np.diag([0.9, 0.8, 2.0, 1.0])), str(path))
    return path


def mask(folder: Path) -> np.ndarray:
    return np.asarray(nib.load(str(folder / "ct_seg.nii.gz")).dataobj)


def infer(checkpoint: str, ct: Path, out: Path, **overrides) -> np.ndarray:
    bundle_run(
        "inference",
        config_file=str(CONFIGS / "inference.json"),
        input=str(ct),
        output_dir=str(out),
        checkpoint=checkpoint,
        precision="fp32",
        overlay=False,
        postprocess=False,
        logging_file=False,
        **overrides,
    )
    return mask(out)


def test_inference_runs_a_torchscript_export_as_its_model(checkpoint, tmp_path):
    ts = tmp_path / "model.ts"
    ckpt_export(checkpoint, ts)
    ct = nifti_ct(tmp_path)
    want = infer(str(checkpoint), ct, tmp_path / "pt")
    got = infer(str(ts), ct, tmp_path / "ts")
    counts = np.bincount(want.ravel(), minlength=4) / want.size
    assert np.sort(counts)[-2] > 0.01, counts  # a class map worth comparing: two classes at least
    assert np.array_equal(want, got)


def test_registry_round_trip_log_promote_and_infer_from_models_uri(checkpoint, tmp_path, monkeypatch):
    from liver_fcn.registry import log_model, promote

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for load_model and inference below
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("registry-test")
    run = client.create_run(exp, run_name="trained")
    info = log_model(uri, run.info.run_id, checkpoint, "liver-fcn-test")
    assert info.registered_model_version == 1
    client.set_terminated(run.info.run_id)
    # the MLflow model: signature, input example, the settings inference needs, the bundle's configs
    model = mlflow.pyfunc.load_model("models:/liver-fcn-test/1")
    x = np.random.default_rng(0).normal(0, 0.3, (2, 1, 64, 96)).astype(np.float32)
    with torch.no_grad():
        want = eager(checkpoint)(torch.from_numpy(x)).argmax(1).numpy()
    assert np.array_equal(model.predict(x), want)
    meta = model.metadata
    assert list(meta.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, -1, -1]
    assert meta.metadata["settings"]["pixel_spacing"] == SETTINGS["pixel_spacing"]
    local = Path(mlflow.artifacts.download_artifacts("models:/liver-fcn-test/1", tracking_uri=uri, registry_uri=uri))
    assert {"model.pt", "inference.json", "pipeline.json", "metadata.json"} <= {
        p.name for p in (local / "artifacts").iterdir()
    }
    assert (local / "input_example.json").is_file()

    version = promote(uri, "liver-fcn-test", "champion", run.info.run_id)
    assert int(version.version) == 1
    ct = nifti_ct(tmp_path)
    by_file = infer(str(checkpoint), ct, tmp_path / "file")
    assert np.array_equal(infer("models:/liver-fcn-test@champion", ct, tmp_path / "alias"), by_file)
    assert np.array_equal(infer("models:/liver-fcn-test/1", ct, tmp_path / "version"), by_file)


def test_unknown_registered_model_is_one_line_and_exit_2(tmp_path):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # an empty store
    r = monai_bundle(
        "run",
        "inference",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--input",
        str(nifti_ct(tmp_path)),
        "--output_dir",
        str(tmp_path / "out"),
        "--checkpoint",
        "models:/nothing@champion",
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: models:/nothing@champion: not found in the model registry at " + uri)
    assert not (tmp_path / "out").exists()
