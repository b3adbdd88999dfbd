"""The model leaving the project the standard ways: MONAI's ckpt_export / onnx_export, and MLflow's
Model Registry (log, register, promote, run inference from models:/ URIs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import run as bundle_run

from liver_fcn.checkpoint import checkpoint_settings, load_model, network_from_settings
from liver_fcn.errors import InputError

from .commands import server, warm_module
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
    version = promote(uri, "liver-fcn-test", "champion", run.info.run_id)
    assert int(version.version) == 1
    ct = nifti_ct(tmp_path)
    by_file = infer(str(checkpoint), ct, tmp_path / "file")
    assert np.array_equal(infer("models:/liver-fcn-test@champion", ct, tmp_path / "alias"), by_file)
    assert np.array_equal(infer("models:/liver-fcn-test/1", ct, tmp_path / "version"), by_file)

    # the MLflow model: a CT path per row in, the mask (the bundle's) and the volumes out
    model = mlflow.pyfunc.load_model("models:/liver-fcn-test@champion")
    table = model.predict(
        pd.DataFrame({"ct": [str(ct)]}), params={"output_dir": str(tmp_path / "pyfunc"), "precision": "fp32"}
    )
    (row,) = table.to_dict("records")
    assert row["case"] == "ct" and row["error"] == "" and Path(row["mask"]) == tmp_path / "pyfunc" / "ct_seg.nii.gz"
    assert np.array_equal(mask(tmp_path / "pyfunc"), by_file)
    report = json.loads(Path(row["report"]).read_text())
    assert row["liver_ml"] == pytest.approx(report["volumes_ml"]["liver"]) and "kidney_ml" in row
    meta = model.metadata
    assert [c["name"] for c in meta.signature.inputs.to_dict()] == ["ct"]
    assert {p.name for p in meta.signature.params} >= {"output_dir", "series", "device", "overlay", "dicom_seg"}
    assert meta.metadata["settings"]["pixel_spacing"] == SETTINGS["pixel_spacing"]
    local = Path(mlflow.artifacts.download_artifacts("models:/liver-fcn-test/1", tracking_uri=uri, registry_uri=uri))
    assert {"model.pt", "inference.json", "pipeline.json", "metadata.json"} <= {
        p.name for p in (local / "artifacts").iterdir()
    }
    # a bad path is one clear error; two CTs of one file name get numbered cases
    with pytest.raises(InputError, match="nowhere.nii.gz: input does not exist"):
        model.predict(pd.DataFrame({"ct": [str(tmp_path / "nowhere.nii.gz")]}))
    (tmp_path / "other").mkdir()
    twin = nifti_ct(tmp_path / "other")
    table = model.predict(pd.DataFrame({"ct": [str(ct), str(twin)]}), params={"output_dir": str(tmp_path / "two")})
    assert list(table["case"]) == ["001_ct", "002_ct"] and list(table["error"]) == ["", ""]


def test_slice_level_model_still_logs_and_predicts(checkpoint, tmp_path, monkeypatch):
    from liver_fcn.registry import log_model

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("slices"), run_name="trained")
    info = log_model(uri, run.info.run_id, checkpoint, None, kind="slices")
    client.set_terminated(run.info.run_id)
    model = mlflow.pyfunc.load_model(info.model_uri)
    x = np.random.default_rng(0).normal(0, 0.3, (2, 1, 64, 96)).astype(np.float32)
    with torch.no_grad():
        want = eager(checkpoint)(torch.from_numpy(x)).argmax(1).numpy()
    assert np.array_equal(model.predict(x), want)
    assert list(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, -1, -1]


def test_mlflow_models_predict_and_serve_segment_a_ct(checkpoint, tmp_path):
    """What a user types: `mlflow models predict` on a JSON input, and a request to `mlflow models serve`
    on 127.0.0.1, both in this environment (--env-manager local)."""
    from liver_fcn.registry import log_model

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("serve"), run_name="trained")
    log_model(uri, run.info.run_id, checkpoint, "liver-fcn-serve")
    client.set_terminated(run.info.run_id)
    client.set_registered_model_alias("liver-fcn-serve", "champion", "1")
    ct = nifti_ct(tmp_path)
    want = infer(str(checkpoint), ct, tmp_path / "bundle")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"MLFLOW_TRACKING_URI": uri}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the environment's uvicorn
    request = {
        "dataframe_split": {"columns": ["ct"], "data": [[str(ct)]]},
        "params": {"output_dir": str(tmp_path / "cli"), "precision": "fp32"},
    }
    (tmp_path / "input.json").write_text(json.dumps(request))
    r = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", "models:/liver-fcn-serve@champion",
         "-i", str(tmp_path / "input.json"), "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert row["error"] == "" and np.array_equal(mask(tmp_path / "cli"), want)

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/liver-fcn-serve@champion",
                "-h", "127.0.0.1", "-p", str(port), "--env-manager", "local", "-w", "1"]  # fmt: skip

    with server(command, "/ping", tmp_path / "serve.log", env=env, timeout=180) as url:
        request["params"]["output_dir"] = str(tmp_path / "served")
        post = urllib.request.Request(
            f"{url}/invocations", json.dumps(request).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(post, timeout=120) as resp:
            (row,) = json.loads(resp.read())["predictions"]
    assert row["case"] == "ct" and row["error"] == "" and row["liver_ml"] >= 0
    assert np.array_equal(mask(tmp_path / "served"), want)


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
