"""The bundle as users run it: `python -m monai.bundle ...` subprocesses on small phantom data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch

from .commands import new_process, warm_module
from .conftest import REPO

CONFIGS = REPO / "bundle" / "configs"
#: the bundle commands run from a folder outside the repository: the bundle finds its own files
OUTSIDE = Path(tempfile.mkdtemp(prefix="liver-fcn-cwd-"))
TINY = {
    "width": "0.0625",
    "pixel_spacing": "6.4",  # 409.6 mm / 6.4 mm = 64 pixels
    "iterations": "4",
    "epoch_length": "2",
    "warmup_iterations": "1",
    "batch_size": "8",
    "num_workers": "0",
    "cache_workers": "0",
    "val_slice_batch": "12",
    "log_every": "1",
}


def bundle(*args: str, env: dict | None = None, timeout: int = 600, new: bool = False) -> subprocess.CompletedProcess:
    """``python -m monai.bundle args`` from a folder outside the repository, forked from the warm
    interpreter of ``commands.py`` (``new=True``: in a new interpreter, as a user's shell starts it)."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    command = new_process if new else warm_module
    return command("monai.bundle", *args, cwd=OUTSIDE, env=full_env, timeout=timeout)


def train(
    prepared: Path, out: Path, *extra: str, env: dict | None = None, new: bool = False, timeout: int = 600
) -> subprocess.CompletedProcess:
    overrides = [x for k, v in TINY.items() for x in (f"--{k}", v)]
    return bundle(
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--dataset_dir",
        str(prepared),
        "--output_dir",
        str(out / "eval"),
        "--ckpt_dir",
        str(out / "models"),
        *overrides,
        *extra,
        env=env,
        new=new,
        timeout=timeout,
    )


def evaluate(dataset_dir: Path, output_dir: Path, ckpt_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`run evaluating` of the checkpoint in ``ckpt_dir`` on a prepared data set."""
    configs = str([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    return bundle(
        "run",
        "evaluating",
        "--config_file",
        configs,
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(output_dir),
        "--ckpt_dir",
        str(ckpt_dir),
        *extra,
    )


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle_run")
    r = train(prepared, out, "--network_def#variant", "4s", new=True)  # in a new interpreter, as users start it
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


def only_run(uri: str, experiment: str = "liver-fcn"):
    """The one training run of the store (evaluation runs, tagged kind=evaluation, left aside)."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") != "evaluation"]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


@pytest.mark.slow
def test_training_run_is_finished_with_metrics_params_and_artifacts(trained, prepared):
    out, r = trained
    uri = f"sqlite:///{out / 'eval' / 'mlruns.db'}"  # the default store, under output_dir
    client, run = only_run(uri)
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("fcn4s-w0.0625-64px-")
    for cls in ("liver", "bone", "kidney"):
        for kind in ("iou", "dice"):
            hist = client.get_metric_history(run.info.run_id, f"val_{kind}_{cls}")
            assert [m.step for m in hist] == [2, 4]  # steps are iterations: validation every 2
            assert all(0.0 <= m.value <= 1.0 for m in hist)
    for key in ("val_mean_iou", "val_mean_dice", "train_loss"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2
    lr = client.get_metric_history(run.info.run_id, "lr_group_0")
    assert lr and lr[-1].value < 3e-4  # the cosine schedule has decayed the rate
    p = run.data.params
    assert p["variant"] == "4s" and float(p["width"]) == 0.0625 and p["image_size"] == "64"
    assert float(p["pixel_spacing"]) == 6.4 and float(p["field_of_view"]) == pytest.approx(409.6)
    assert float(p["lr"]) == 3e-4 and p["betas"] == "[0.9, 0.99]" and p["batch_size"] == "8"
    assert p["hu_window"] == "[-250, 450]" and p["iterations"] == "4" and p["seed"] == "0"
    assert p["lr_schedule"] == "cosine" and p["epoch_length"] == "2" and p["val_interval"] == "1"
    assert p["bone_min_hu"] == "None"  # bone as the masks draw it, recorded so runs compare
    for name in ("rotate", "zoom", "translate", "hu_offset", "contrast", "noise", "blur", "lowres", "gamma"):
        assert f"{name} p=" in p["augmentation"], name
    assert "flip" not in p["augmentation"]  # no left-right flip by default: the liver is on one side
    assert "phase" not in p["augmentation"]  # the contrast-phase augmentation is off by default
    assert "soft Dice" in p["loss"] and p["dataset"].endswith("datalist.json")
    assert p["train_patients"] == "3" and p["val_patients"] == "1" and int(p["train_slices"]) == 36
    assert p["sampling"] == "shuffled"  # equal weights: the loader simply shuffles
    assert run.data.tags["variant"] == "4s"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert any(a.endswith(".json") for a in artifacts)
    # the best checkpoint is the run's MLflow model, registered as version 1 of liver-fcn
    (version,) = client.search_model_versions("name = 'liver-fcn'")
    assert version.run_id == run.info.run_id and int(version.version) == 1
    assert f"registered {out / 'models' / 'model.pt'} as models:/liver-fcn/1" in r.stdout
    local = Path(client.download_artifacts(run.info.run_id, next(a for a in artifacts if a.endswith(".json"))))
    cfg = json.loads(local.read_text())
    assert cfg["iterations"] == 4 and cfg["network_def"]["variant"] == "4s"  # the config as run, overrides applied
    assert (
        cfg["_pipeline_"]["resample"][1]["_target_"] == "liver_fcn.transforms.InPlaneResampled"
    )  # the shared chain, copied in
    resolved = cfg["_resolved_"]
    assert resolved["ckpt_dir"] == str(out / "models") and resolved["run_name"] == run.info.run_name
    assert resolved["num_classes"] == 4 and resolved["device"] == "cpu"
    ckpt = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert "score_pool2.weight" in ckpt["model"] and ckpt["model"]["score_fr.weight"].shape[0] == 4
    assert ckpt["settings"]["variant"] == "4s" and ckpt["settings"]["image_size"] == 64
    assert ckpt["settings"]["pixel_spacing"] == 6.4 and ckpt["settings"]["hu_window"] == [-250, 450]
    assert ckpt["settings"]["run_name"] == run.info.run_name
    assert "val_iou_liver" in r.stdout and "mlflow ui --backend-store-uri" in r.stdout


@pytest.mark.slow
def test_the_recipe_learns_the_phantom_liver(prepared, tmp_path):
    """Training as users run it, long enough to learn: 400 iterations of a 1/16-width FCN-8s at
    3.2 mm pixels (128 x 128) on three phantom patients reach a validation liver IoU of at least
    0.75 on the fourth (0.31, 0.81, 0.84, 0.84 at iterations 100-400 when this test was written).
    The augmentation's random draws move the best figure: over seeds 0-4 it was 0.78-0.88 with the
    per-slice augmentation and 0.79-0.84 with the batch stage, one seed stalling at 0.38; a recipe
    that does not learn stays at 0.1-0.4."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    r = train(
        prepared,
        tmp_path,
        "--pixel_spacing",
        "3.2",
        "--iterations",
        "400",
        "--epoch_length",
        "100",
        "--warmup_iterations",
        "20",
        "--learning_rate",
        "0.001",
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client, run = only_run(uri)
    history = client.get_metric_history(run.info.run_id, "val_iou_liver")
    assert [m.step for m in history] == list(range(100, 401, 100))
    best = max(m.value for m in history)
    assert best >= 0.75, [round(m.value, 3) for m in history]
    # model.pt is the best validation's
    ckpt = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["settings"]["pixel_spacing"] == 3.2 and ckpt["settings"]["image_size"] == 128


@pytest.mark.slow
def test_a_crashing_run_is_marked_failed(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    r = train(prepared, tmp_path, "--loss#num_classes", "3", env={"MLFLOW_TRACKING_URI": uri})
    assert r.returncode != 0
    client, run = only_run(uri)
    assert run.info.status == "FAILED"
    assert "logits have 4 channels, expected 3" in run.data.tags["error"]


@pytest.mark.slow
def test_bad_dataset_dir_fails_before_any_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    r = train(tmp_path / "nothing", tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "datalist.json: datalist not found; run `liver-fcn prepare --out <dataset_dir>`" in r.stderr.splitlines()[-1]
    assert not (tmp_path / "models").exists()


def test_one_version_for_package_and_bundle_and_measured_eval_metrics():
    import liver_fcn

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] == liver_fcn.__version__ == meta["required_packages_version"]["liver-fcn"]
    assert liver_fcn.__version__ in meta["changelog"]
    assert meta["eval_metrics"] and all(isinstance(v, float) and 0 < v < 1 for v in meta["eval_metrics"].values())


def test_metadata_verifies_offline_and_network_matches_it():
    r = bundle(
        "verify_metadata",
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--filepath",
        str(REPO / "bundle" / "docs" / "meta_schema.json"),
    )
    assert r.returncode == 0 and "metadata is verified with no error" in r.stdout + r.stderr, r.stderr[-2000:]
    r = bundle(
        "verify_net_in_out",
        "--net_id",
        "network_def",
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--config_file",
        str(CONFIGS / "train.json"),
        "--width",
        "0.0625",
        "--n",
        "3",
    )
    assert r.returncode == 0 and "data shape of network is verified" in r.stdout + r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("workflow_type", ["train", "infer"])
def test_monai_property_check_passes_from_another_folder(workflow_type, trained, prepared, tmp_path, monkeypatch):
    """What the model-zoo CI runs: MONAI's ConfigWorkflow property check, here from outside the repository."""
    from monai.bundle import ConfigWorkflow

    out, _ = trained
    monkeypatch.chdir(tmp_path)
    if workflow_type == "train":
        config = CONFIGS / "train.json"
        overrides = {
            **TINY,
            "dataset_dir": str(prepared),
            "output_dir": str(tmp_path / "eval"),
            "ckpt_dir": str(tmp_path / "models"),
        }
        overrides = {
            k: v if k in ("dataset_dir", "output_dir", "ckpt_dir") else float(v) if "." in v else int(v)
            for k, v in overrides.items()
        }
    else:
        config = CONFIGS / "inference.json"
        overrides = {
            "dataset_dir": str(prepared),
            "checkpoint": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path / "inference"),
        }
    workflow = ConfigWorkflow(config_file=str(config), workflow_type=workflow_type, **overrides)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert Path(workflow.bundle_root).resolve() == (REPO / "bundle").resolve()
    assert workflow.val_interval == 1 if workflow_type == "train" else workflow.dataset_dir == str(prepared)
    if workflow_type == "train":
        assert workflow.max_epochs == 2 and workflow.trainer.state.epoch_length == 2
    assert not list(tmp_path.glob("*mlruns*")) and not (tmp_path / "bundle").exists()


@pytest.mark.slow
def test_monai_tracking_option_logs_into_the_same_run(prepared, tmp_path):
    """``--tracking mlflow`` (MONAI's own MLflow handlers) fits: they log into the bundle's run and store."""
    r = train(prepared, tmp_path, "--tracking", "mlflow")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    client, run = only_run(f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    assert run.info.status == "FINISHED" and "val_iou_liver" in run.data.metrics and "train_loss" in run.data.metrics


def test_an_old_val_interval_is_refused_with_its_new_meaning(prepared, tmp_path):
    r = train(prepared, tmp_path, "--val_interval", "100")
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --val_interval 100 is more periods than the training has (2 of --epoch_length 2")
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_inference_with_the_trained_checkpoint(trained, prepared, tmp_path):
    out, _ = trained
    patient = json.loads((prepared / "datalist.json").read_text())["test"][0]
    r = bundle(
        "run",
        "inference",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--input",
        str(prepared / patient["image"]),
        "--output_dir",
        str(tmp_path / "pred"),
        "--checkpoint",
        str(out / "models" / "model.pt"),
        "--dicom_seg",
        "true",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    name = patient["patient"]
    files = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert files == [
        f"{name}_overlay.png",
        f"{name}_report.json",
        f"{name}_seg.dcm",
        f"{name}_seg.nii.gz",
        "summary.csv",
        "summary.json",
    ]
    report = json.loads((tmp_path / "pred" / f"{name}_report.json").read_text())
    assert report["shape"] == patient["shape"] and report["spacing_mm"] == pytest.approx(patient["spacing"], abs=1e-3)
    assert f"{name}: " in r.stdout and "1 case written to" in r.stdout


@pytest.mark.slow
def test_compare_promotes_the_best_run_and_inference_takes_the_alias(trained, prepared, tmp_path):
    out, _ = trained
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "liver-fcn"),
            "compare",
            "--output_dir",
            str(out / "eval"),
            "--out",
            str(tmp_path / "cmp"),
            "--promote",
            "champion",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "models:/liver-fcn@champion -> version 1 (run fcn4s-w0.0625-64px-" in r.stdout
    patient = json.loads((prepared / "datalist.json").read_text())["test"][0]
    r = bundle(
        "run",
        "inference",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--input",
        str(prepared / patient["image"]),
        "--output_dir",
        str(tmp_path / "pred"),
        "--checkpoint",
        "models:/liver-fcn@champion",
        "--overlay",
        "false",
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{out / 'eval' / 'mlruns.db'}"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "pred" / f"{patient['patient']}_seg.nii.gz").is_file()


def test_demo_overlay_of_the_trained_checkpoint(trained, prepared, tmp_path):
    out, _ = trained  # trained with other settings than train.json's: the checkpoint's own are used
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "workflows" / "overlay.py"),
            "--dataset_dir",
            str(prepared),
            "--checkpoint",
            str(out / "models" / "model.pt"),
            "--out",
            str(tmp_path / "overlay.png"),
            "--tracking_uri",
            f"sqlite:///{out / 'eval' / 'mlruns.db'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # and into the checkpoint's MLflow run, beside the learning curves and the overlay the training drew
    client, run = only_run(f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/learning_curves.png",
        f"plots/{run.info.run_name}_overlay.png",
        "plots/overlay.png",
    }


@pytest.mark.slow
def test_evaluation_writes_metrics_and_an_mlflow_run(trained, prepared):
    out, _ = trained
    r = evaluate(
        prepared,
        out / "eval",
        out / "models",
        "--eval_split",
        "validation",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    folders = list((out / "eval" / "evaluation").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("eval-fcn4s-w0.0625-64px-")
    header = (folders[0] / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("patient,condition,class,annotated,dice,iou,voe,rvd,assd,mssd,slice_iou")
    with open(folders[0] / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    (entry,) = json.loads((prepared / "datalist.json").read_text())["validation"]
    # one validation patient, by its name, clean, scanner-shifted and in another contrast phase, three classes each
    assert [(r["patient"], r["condition"], r["class"]) for r in rows] == [
        (entry["patient"], cond, cls) for cond in ("clean", "shifted", "phase") for cls in ("liver", "bone", "kidney")
    ]
    for r in rows:
        assert r["annotated"] == str(entry["annotated"][["liver", "bone", "kidney"].index(r["class"]) + 1])
        assert (r["dice"] == "nan") == (r["annotated"] == "False")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("liver-fcn")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'evaluation'")
    assert run.info.status == "FINISHED" and run.data.params["split"] == "validation"
    assert {
        "test_dice_liver",
        "test_assd_liver",
        "test_mssd_bone",
        "test_slice_iou_liver",
        "test_shifted_dice_liver",
        "test_shift_change_dice_liver",
        "test_phase_dice_kidney",
        "test_phase_change_dice_liver",
    } <= set(run.data.metrics)
    assert run.data.tags["trained_run"].startswith("fcn4s-")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.csv", "summary.csv", "summary.json"}


def test_evaluation_leaves_out_classes_a_patient_has_no_masks_for(trained, prepared, tmp_path):
    """Through `run evaluating`: a patient without kidney masks is named, and its kidney is not scored
    (NaN, left out of the mean) rather than scored 0."""
    out, _ = trained
    entries = json.loads((prepared / "datalist.json").read_text())["training"]
    without = [e["patient"] for e in entries if not e["annotated"][3]]
    assert without, "the phantom set should hold a patient without kidney masks"
    r = evaluate(
        prepared,
        tmp_path / "eval",
        out / "models",
        "--eval_split",
        "training",
        "--eval_name",
        "no-kidney",
        "--scanner_shift",
        "false",
        "--phase_shift",
        "False",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(tmp_path / "eval" / "evaluation" / "no-kidney" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({row["patient"] for row in rows}) == sorted(e["patient"] for e in entries)
    assert {row["condition"] for row in rows} == {"clean"}  # both shifts off, typed as users type them
    for row in rows:
        scored = row["class"] != "kidney" or row["patient"] not in without
        assert row["annotated"] == str(scored) and (row["dice"] != "nan") == scored, row
    summary = json.loads((tmp_path / "eval" / "evaluation" / "no-kidney" / "summary.json").read_text())
    kidney = next(s for s in summary if s["class"] == "kidney" and s["metric"] == "dice")
    assert kidney["n"] == len(entries) - len(without)


def test_a_trained_model_is_evaluated_on_a_set_of_new_patients(trained, phantom_root, tmp_path):
    """`liver-fcn prepare --test_patients all` makes a set with no training patient, and `run
    evaluating` scores the trained checkpoint on every patient of it (its test split, the default)."""
    from liver_fcn.data.ircadb import prepare

    out, _ = trained
    prepare(phantom_root, tmp_path / "new", test_patients=["all"], log=lambda s: None)
    data = json.loads((tmp_path / "new" / "datalist.json").read_text())
    assert data["training"] == data["validation"] == [] and len(data["test"]) == 5
    r = evaluate(
        tmp_path / "new",
        tmp_path / "eval",
        out / "models",
        "--eval_name",
        "new",
        "--scanner_shift",
        "false",
        "--phase_shift",
        "false",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(tmp_path / "eval" / "evaluation" / "new" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({row["patient"] for row in rows}) == sorted(e["patient"] for e in data["test"])


def test_configs_wire_with_short_expressions_and_literal_handler_lists():
    """Configs name and connect objects; computing is the package's: no expression over 100 characters."""

    def expressions(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from expressions(v)
        elif isinstance(node, list):
            for v in node:
                yield from expressions(v)
        elif isinstance(node, str) and node.startswith("$"):
            yield node

    for path in sorted(CONFIGS.glob("*.json")):
        config = json.loads(path.read_text())
        long = [e for e in expressions(config) if len(e) > 100]
        assert long == [], (path.name, long)
    train = json.loads((CONFIGS / "train.json").read_text())
    assert all(isinstance(h, dict) for h in train["train"]["handlers"])  # what MONAI's property check reads
    assert {"mlflow_params", "augmentation_summary"}.isdisjoint(train)
    multi = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    assert "training" not in multi and "initialize" not in multi  # it layers on train.json's sequences


def test_torchrun_processes_seed_their_generators_with_their_rank(monkeypatch):
    """Under multi_gpu_train.json each process seeds with seed + rank: the loaders' workers and the
    batch augmentation draw from those generators, so the processes do not draw the same transforms."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    parser["seed"] = 5
    first = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        parser.parse(reset=True)
        parser.get_parsed_content("initialize#0", lazy=False)
        assert torch.initial_seed() == 5 + int(rank)
        first.append(torch.rand(3))
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("benchmark", [False, True, "true"])
def test_cudnn_benchmark_option_follows_set_determinism(benchmark):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["cudnn_benchmark"] = benchmark
    flags = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        parser.get_parsed_content("initialize#0", lazy=False)  # MONAI's set_determinism: deterministic cuDNN
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        parser.get_parsed_content("initialize#1", lazy=False)
        fast = benchmark in (True, "true")
        assert torch.backends.cudnn.benchmark == fast and torch.backends.cudnn.deterministic == (not fast)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags
