"""Scale-out and team use: torchrun DDP on CPUs, a real MLflow server, resuming a killed run,
ImageNet initialisation and staged training through the bundle command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from liver_fcn.data.ircadb import prepare
from liver_fcn.networks import FCN
from liver_fcn.training import prepare_network

from .commands import free_port, server, warm_module
from .conftest import REPO
from .test_bundle import CONFIGS, TINY, bundle, train

pytestmark = pytest.mark.slow


def tiny_overrides(**changes) -> list[str]:
    values = {**TINY, **{k: str(v) for k, v in changes.items()}}
    return [x for k, v in values.items() for x in (f"--{k}", v)]


@pytest.fixture(scope="module")
def prepared_two_val(phantom_root, tmp_path_factory) -> Path:
    """The phantoms with two validation patients (one per process for the DDP test)."""
    out = tmp_path_factory.mktemp("prepared2") / "data"
    prepare(phantom_root, out, val_fraction=0.4, test_fraction=0.0, log=lambda s: None)
    return out


def runs_of(uri: str, experiment: str = "liver-fcn"):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (
        [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") != "evaluation"] if exp else []
    )


def training_command(prepared: Path, out: Path, **changes) -> list[str]:
    """``python -m monai.bundle run training`` of the tiny recipe on ``prepared``, into ``out/eval``
    and ``out/models``, for a test that starts (and kills) it itself."""
    return [
        sys.executable,
        "-m",
        "monai.bundle",
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
        *tiny_overrides(**changes),
    ]


def steps(client, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_torchrun_two_processes_on_cpu_log_one_finished_run(prepared_two_val, tmp_path):
    uri = f"sqlite:///{tmp_path / 'ddp.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")]),
        "--dataset_dir",
        str(prepared_two_val),
        "--output_dir",
        str(tmp_path / "eval"),
        "--ckpt_dir",
        str(tmp_path / "models"),
        "--slice_class_weight",  # each process draws its share by weight
        "{'kidney': 2.0}",
        *tiny_overrides(),
    ]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client, runs = runs_of(uri)
    assert len(runs) == 1, [x.info.run_name for x in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert steps(client, run, "val_iou_liver") == [2, 4] and steps(client, run, "train_loss") == [2, 4]
    assert run.data.params["val_patients"] == "2" and run.data.params["train_slices"] == "36"
    assert run.data.params["sampling"] == "weighted, each of 2 processes its share"
    models = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert "model.pt" in models and sum(p.endswith("_checkpoint_epoch=2.pt") for p in models) == 1
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in state)  # the plain network, not the DDP wrapper
    print(f"torchrun --nproc_per_node 2 on CPU (gloo), 4 iterations: {elapsed:.1f} s")


def test_torchrun_shards_an_archive_and_writes_one_summary(tmp_path):
    """torchrun --nproc_per_node 2 on CPU: each process writes its own cases, the first the summary."""
    import nibabel as nib
    import numpy as np

    from liver_fcn.networks import FCN

    torch.manual_seed(0)
    settings = {
        "variant": "8s",
        "width": 1 / 16,
        "in_channels": 1,
        "class_names": ["background", "liver", "bone", "kidney"],
        "pixel_spacing": 2.0,
        "image_size": 96,
        "hu_window": [-250, 450],
        "intensity_mean": 0.19,
    }
    torch.save({"model": FCN("8s", 1, 4, width=1 / 16).state_dict(), "settings": settings}, tmp_path / "model.pt")
    ct = np.full((48, 40, 6), -1000, np.int16)
    ct[10:30, 10:30, 1:5] = 60
    names = [f"case{i}" for i in range(5)]
    for n in names:
        nib.save(nib.Nifti1Image(ct, np.diag([2.0, 2.0, 5.0, 1.0])), str(tmp_path / f"{n}.nii.gz"))
    (tmp_path / "list.json").write_text(json.dumps([f"{n}.nii.gz" for n in names]))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "monai.bundle",
        "run",
        "inference",
        "--config_file",
        str(REPO / "bundle/configs/inference.json"),
        "--input",
        str(tmp_path / "list.json"),
        "--checkpoint",
        str(tmp_path / "model.pt"),
        "--output_dir",
        str(out),
        "--overlay",
        "false",
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [w["case"] for w in summary["written"]] == names and summary["failed"] == []
    assert sorted(p["cases"] for p in summary["processes"]) == [2, 3]  # cases 0, 2, 4 and 1, 3
    table = (out / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in table[1:]] == names  # one table of both processes' cases
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == [f"{n}_seg.nii.gz" for n in names]
    assert r.stdout.count("5 cases written to") == 1  # one summary line, from the first process


def mlflow_server_command(root: Path):
    """``command(port)``: a real `mlflow server` on 127.0.0.1 with its SQLite backend and artifact store in ``root``."""

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
        ]  # fmt: skip

    return command


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and a local artifact store."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with server(mlflow_server_command(root), "/health", root / "server.log") as url:
        yield url, root


def test_team_server_two_runs_compared_over_http(mlflow_server, prepared, tmp_path):
    url, root = mlflow_server
    env = {"MLFLOW_TRACKING_URI": url}
    common = [
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--dataset_dir",
        str(prepared),
        "--output_dir",
        str(tmp_path / "eval"),
        "--experiment_name",
        "team",
    ]
    r8 = bundle(*common, "--ckpt_dir", str(tmp_path / "m8"), *tiny_overrides(), env=env)
    assert r8.returncode == 0, r8.stderr[-3000:]
    # FCN-4s staged from the FCN-8s checkpoint: shared tensors loaded, the pool2 skip starts at zero
    r4 = bundle(
        *common,
        "--ckpt_dir",
        str(tmp_path / "m4"),
        *tiny_overrides(),
        "--network_def#variant",
        "4s",
        "--init_checkpoint",
        str(tmp_path / "m8" / "model.pt"),
        env=env,
    )
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert "kept their initialisation: score_pool2, upscore4, upscore_pool3" in r4.stdout + r4.stderr
    assert "not used: upscore8" in r4.stdout + r4.stderr
    client, runs = runs_of(url, "team")
    assert sorted(x.data.params["variant"] for x in runs) == ["4s", "8s"]
    assert all(x.info.status == "FINISHED" for x in runs)
    # each run's best checkpoint is a version of the server's registered model, its files in the server's store
    versions = client.search_model_versions("name = 'liver-fcn'")
    assert sorted(v.run_id for v in versions) == sorted(x.info.run_id for x in runs)
    assert len(list((root / "artifacts").rglob("model.pt"))) == 2
    out = tmp_path / "compare"
    c = warm_module(
        "liver_fcn.cli",
        "compare",
        "--experiment",
        "team",
        "--tracking_uri",
        url,
        "--out",
        str(out),
        "--log_run",
        cwd=REPO,
        timeout=300,
    )
    assert c.returncode == 0, c.stderr[-2000:]
    assert "2 runs of experiment 'team'" in c.stdout
    assert "fcn8s-w0.0625-64px-" in c.stdout and "fcn4s-w0.0625-64px-" in c.stdout
    md = (out / "comparison.md").read_text()
    assert md.count("| fcn") == 2 and "best iou liver" in md
    header = (out / "comparison.csv").read_text().splitlines()[0]
    assert header.startswith("run,run_id,status,variant,width,image_size,lr,batch_size,best_iou_liver")
    assert (out / "curves.png").stat().st_size > 10_000
    check_the_story_over_rest(url, [x.info.run_id for x in runs])


def rest(url: str, endpoint: str, **query) -> dict:
    from urllib.parse import urlencode

    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def check_the_story_over_rest(url: str, run_ids: list[str]) -> None:
    """What a user of the shared server sees, read through MLflow's REST API as its UI does."""
    exp = rest(url, "experiments/get-by-name", experiment_name="team")["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    digests = set()
    for run_id in run_ids:
        run = rest(url, "runs/get", run_id=run_id)["run"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        # provenance: the command, the user, the commit of this checkout, the versions
        assert tags["mlflow.source.name"] == "monai.bundle run training (train.json)"
        assert tags["command"].startswith("python -m monai.bundle run training --config_file ")
        assert (
            tags["mlflow.source.git.commit"]
            == subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        )
        assert tags["liver_fcn.version"] and tags["monai.version"] and tags["torch.version"] and tags["python.version"]
        # the best validation and the checkpoint it chose
        assert {"best_val_iou_liver", "best_val_dice_kidney", "best_iteration"} <= set(metrics)
        assert tags["best_checkpoint"].startswith(
            f"model.pt = the validation at iteration {int(metrics['best_iteration'])}"
        )
        assert "trained on 3 patients" in tags["mlflow.note.content"]
        # the data set: names and a digest, no local path
        (given,) = run["inputs"]["dataset_inputs"]
        dataset = given["dataset"]
        assert dataset["name"] == "3D-IRCADb-01" and "/" not in dataset["source"]
        assert json.loads(dataset["source"])["patients"]["validation"] == ["3Dircadb1.4"]
        digests.add(dataset["digest"])
        # artifacts: the config as run, the training log, the learning curves, the best checkpoint's overlay
        files = {f["path"] for f in rest(url, "artifacts/list", run_id=run_id).get("files", [])}
        assert {"logs", "plots"} <= files and any(f.endswith(".json") for f in files)
        assert {f["path"] for f in rest(url, "artifacts/list", run_id=run_id, path="plots")["files"]} == {
            "plots/learning_curves.png",
            f"plots/{run['info']['run_name']}_overlay.png",
        }
        (log,) = rest(url, "artifacts/list", run_id=run_id, path="logs")["files"]
        assert log["file_size"] > 1000
    assert len(digests) == 1  # the same patients: the same digest
    body = json.dumps({"experiment_ids": [exp["experiment_id"]], "filter": "tags.kind = 'comparison'"}).encode()
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        comparisons = json.loads(r.read())["runs"]
    assert len(comparisons) == 1 and {p["key"]: p["value"] for p in comparisons[0]["data"]["params"]}["runs"] == "2"


def test_an_unreachable_tracking_server_stops_training_before_any_work_or_falls_back(prepared, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = train(prepared, tmp_path, "--tracking_uri", uri, env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {uri}: MLflow tracking server unreachable ([Errno 111] Connection refused); start it, record to "
        "a local store with --tracking_uri sqlite:///path/to/mlruns.db, or fall back to one with "
        "--tracking_fallback sqlite:///..."
    )
    assert not (tmp_path / "eval").exists() and not (tmp_path / "models").exists()  # nothing begun
    # with a fallback store, the training goes on into it and says so
    local = f"sqlite:///{tmp_path / 'local.db'}"
    r = train(prepared, tmp_path, "--tracking_uri", uri, "--tracking_fallback", local, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        f"MLflow tracking server {uri} unreachable ([Errno 111] Connection refused): this run is recorded in {local}"
        in (r.stdout + r.stderr)
    )
    client, (run,) = runs_of(local)
    assert run.info.status == "FINISHED" and steps(client, run, "val_iou_liver") == [2, 4]


def test_a_tracking_server_lost_mid_training_loses_nothing(prepared, tmp_path):
    """The server stopped at epoch 3 of 12 and not back before the end: the training finishes and saves its
    model, the rest of the run is kept on disk, and `liver-fcn sync` sends it to the server once it is back
    (its database and artifacts as they were): the run ends FINISHED with every period, curves, model."""
    root = tmp_path / "server"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    periods = 12
    cmd = training_command(prepared, tmp_path, iterations=2 * periods)
    with server(mlflow_server_command(root), "/health", root / "server.log") as url:
        proc = subprocess.Popen(
            [*cmd, "--tracking_uri", url],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 300
        while not list((tmp_path / "models").glob("*_checkpoint_epoch=3.pt")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no epoch-3 checkpoint in time"
            time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)  # the server is gone
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert f"MLflow tracking server {url} unreachable" in out and "training goes on" in out
    assert "Traceback" not in out and " - ERROR - " not in out
    offline = tmp_path / "eval" / "mlflow-offline"
    (kept,) = offline.iterdir()
    assert f"send it with: liver-fcn sync {kept}" in out
    with server(mlflow_server_command(root), "/health", root / "server-again.log") as again:
        r = warm_module("liver_fcn.cli", "sync", str(offline), "--tracking_uri", again, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        client = mlflow.MlflowClient(tracking_uri=again)
        run = client.get_run(kept.name)
        assert run.info.status == "FINISHED"
        assert steps(client, run, "val_iou_liver") == list(range(2, 2 * periods + 1, 2))
        assert steps(client, run, "train_loss") == list(range(2, 2 * periods + 1, 2))
        assert (
            "best_val_iou_liver" in run.data.metrics and "trained on 3 patients" in run.data.tags["mlflow.note.content"]
        )
        files = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
        assert "plots/learning_curves.png" in files
        assert [f.path for f in client.list_artifacts(run.info.run_id, "logs")]
        (version,) = client.search_model_versions("name = 'liver-fcn'")
        assert version.run_id == run.info.run_id
    assert not kept.exists()  # sent, and removed


def test_records_kept_while_the_server_is_away_are_sent_when_it_answers_again(tmp_path, monkeypatch):
    from mlflow.entities import Metric

    from liver_fcn.offline import OfflineClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    command = mlflow_server_command(root)

    def metric(step: int) -> Metric:
        return Metric("loss", float(step), int(time.time() * 1000), step)

    with server(command, "/health", root / "first.log", port=port) as url:
        mlflow_client = mlflow.MlflowClient(tracking_uri=url)
        run_id = mlflow_client.create_run(mlflow_client.create_experiment("away")).info.run_id
        client = OfflineClient.of(mlflow_client, run_id, tmp_path / "kept", url, retry_every=0)
        client.log_batch(run_id, metrics=[metric(1)])
        assert not client.offline and client.get_run(run_id).info.run_id == run_id
    client.log_batch(run_id, metrics=[metric(2)])  # the server is away: kept
    client.set_tag(run_id, "note", "kept")
    assert client.offline and client.records.pending() == 2
    assert client.get_run(run_id).info.run_id == run_id  # the last answer
    with pytest.raises(ConnectionError, match="the tracking server is away"):
        client.get_metric_history(run_id, "loss")
    with server(command, "/health", root / "again.log", port=port):
        # a resumed run (a new process) sends what an earlier one kept before anything else
        resumed = OfflineClient(mlflow_client, run_id, client.records, retry_every=0)
        assert not resumed.offline and not client.records.folder.exists()
        client.log_batch(run_id, metrics=[metric(3)])  # back: this client goes online again
        assert not client.offline
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
        assert client.get_run(run_id).data.tags["note"] == "kept"


def test_killed_training_resumes_into_the_same_run(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path / 'resume.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_TRACKING_URI"] = uri
    periods = 30  # validation periods of 2 iterations: far more than can pass between two polls
    cmd = training_command(prepared, tmp_path, iterations=2 * periods)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "models").glob("*_checkpoint_epoch=2.pt")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no epoch-2 checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, "training finished before it could be killed:\n" + out[-5000:]
    client, (run,) = runs_of(uri)
    assert run.info.status == "FAILED" and "terminated by signal SIGTERM" in run.data.tags["error"]
    done = steps(client, run, "val_iou_liver")
    assert done[:2] == [2, 4] and len(done) < periods

    r = subprocess.run([*cmd, "--resume", "True"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client, runs = runs_of(uri)
    assert [x.info.run_id for x in runs] == [run.info.run_id]  # the same run, continued
    assert runs[0].info.status == "FINISHED"
    assert steps(client, run, "val_iou_liver") == list(range(2, 2 * periods + 1, 2))  # no period lost, none twice
    assert steps(client, run, "train_loss") == list(range(2, 2 * periods + 1, 2))
    ckpt = torch.load(next((tmp_path / "models").glob(f"*_checkpoint_epoch={periods}.pt")), weights_only=True)
    assert ckpt["trainer"]["iteration"] == periods * ckpt["trainer"]["epoch_length"] == 2 * periods
    assert ckpt["lr_scheduler"]["last_epoch"] == 2 * periods  # the schedule resumed where it stopped
    assert ckpt["run"]["run_name"] == run.info.run_name
    assert "optimizer" in ckpt and ckpt["optimizer"]["state"]
    # resuming it with another preprocessing is refused before anything runs
    other = subprocess.run(
        [*cmd, "--resume", "True", "--pixel_spacing", "3.2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert other.returncode == 2
    assert (
        other.stderr.strip().splitlines()[-1].endswith("trained with pixel_spacing=6.4, this run has pixel_spacing=3.2")
    )


def test_training_killed_outright_resumes_from_its_last_whole_checkpoint(prepared, tmp_path):
    """SIGKILL, which no handler sees, three times (at epochs 3, 8 and 14, the first one sooner if a
    checkpoint's temporary file is seen while it is written); every checkpoint left loads, and --resume True ends
    the same MLflow run FINISHED with every validation period logged."""
    uri = f"sqlite:///{tmp_path / 'kill9.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_TRACKING_URI"] = uri
    periods = 40
    models = tmp_path / "models"
    cmd = training_command(prepared, tmp_path, iterations=2 * periods)
    kills = 0
    for attempt, epoch in enumerate((3, 8, 14)):
        resume = ["--resume", "True"] if attempt else []
        proc = subprocess.Popen([*cmd, *resume], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            done = models.is_dir() and list(models.glob(f"*_checkpoint_epoch={epoch}.pt"))
            writing = models.is_dir() and [p for p in models.iterdir() if not p.name.endswith(".pt")]
            if done or (attempt == 0 and writing and list(models.glob("*_checkpoint_epoch=*.pt"))):
                proc.kill()  # at epoch N, or sooner if a checkpoint's temporary file is seen
                kills += 1
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        client, (run,) = runs_of(uri)
        for ckpt in models.glob("*_checkpoint_epoch=*.pt"):  # never a torn checkpoint
            torch.load(ckpt, map_location="cpu", weights_only=True)
        if run.info.status == "FINISHED":  # the last attempt ended its run just before the kill
            break
        assert run.info.status == "RUNNING"  # nothing could mark it
    assert kills >= 2, "the training finished before it could be killed"
    r = subprocess.run([*cmd, "--resume", "True"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client, runs = runs_of(uri)
    assert [x.info.run_id for x in runs] == [run.info.run_id] and runs[0].info.status == "FINISHED"
    # every period logged; one whose checkpoint a kill beat is logged again at the same step on resume
    assert sorted(set(steps(client, run, "val_iou_liver"))) == list(range(2, 2 * periods + 1, 2))
    last = torch.load(next(models.glob(f"*_checkpoint_epoch={periods}.pt")), weights_only=True)
    assert last["trainer"]["iteration"] == 2 * periods and (models / "model.pt").is_file()


def test_a_full_disk_while_a_checkpoint_is_written_names_it_and_keeps_the_last_whole_one(prepared, tmp_path):
    """A resumed training under a 4 MB file size limit (RLIMIT_FSIZE: writes beyond it fail with EFBIG, as
    on a full disk): the epoch checkpoint (6.4 MB) cannot be written. One line names it, no temporary
    file stays, the run is FAILED with that error, and the earlier checkpoint is untouched."""
    import resource

    uri = f"sqlite:///{tmp_path / 'full.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_TRACKING_URI"] = uri
    models = tmp_path / "models"
    r = subprocess.run(training_command(prepared, tmp_path), cwd=REPO, env=env, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (earlier,) = models.glob("*_checkpoint_epoch=2.pt")
    before = {p.name: p.read_bytes() for p in models.iterdir()}

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000))

    cmd = [*training_command(prepared, tmp_path, iterations=8), "--resume", "True"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, preexec_fn=small_files)
    assert r.returncode == 1, r.stderr[-3000:]
    written = models / earlier.name.replace("epoch=2", "epoch=3")
    message = f"[Errno 27] File too large while writing: '{written}'"
    assert r.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in r.stderr + r.stdout
    assert not written.exists() and sorted(p.name for p in models.iterdir()) == sorted(before)  # nothing torn
    assert earlier.read_bytes() == before[earlier.name]
    client, runs = runs_of(uri)  # the finished run, and the resumed one (a finished run is not written to)
    (failed,) = [x for x in runs if x.info.status != "FINISHED"]
    assert failed.info.status == "FAILED" and message in failed.data.tags["error"]


def test_resume_with_other_settings_or_without_checkpoint_is_refused(prepared, tmp_path):
    r = bundle(
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--dataset_dir",
        str(prepared),
        "--output_dir",
        str(tmp_path / "eval"),
        "--ckpt_dir",
        str(tmp_path / "none"),
        *tiny_overrides(),
        "--resume",
        "True",
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .endswith("none: no training checkpoint (<run>_checkpoint_epoch=N.pt) to resume from")
    )


def test_coarser_stage_initialises_a_finer_one(tmp_path):
    torch.manual_seed(0)
    coarse = FCN("16s", out_channels=4, width=1 / 16, dropout=0.0).eval()
    for m in (coarse.score_fr, coarse.score_pool4):
        nn.init.normal_(m.weight, 0, 0.2)
    torch.save({"model": coarse.state_dict(), "settings": {"variant": "16s"}}, tmp_path / "stage16.pt")
    fine = prepare_network(
        FCN("8s", out_channels=4, width=1 / 16, dropout=0.0), "cpu", tmp_path / "stage16.pt", log=lambda s: None
    ).eval()
    assert torch.equal(fine.features[0].weight, coarse.features[0].weight)
    assert torch.count_nonzero(fine.score_pool3.weight) == 0
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        a, b = coarse(x), fine(x)
    # 2x then 8x bilinear upsampling of the same fused scores instead of 16x at once: the finer
    # network starts from (nearly) the coarser one's output and labels
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    assert torch.corrcoef(torch.stack([a[inner].flatten(), b[inner].flatten()]))[0, 1] > 0.99
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.98


def test_imagenet_weights_through_the_bundle(prepared, tmp_path):
    from monai.bundle import ConfigParser

    from liver_fcn.networks import vgg16_to_fcn

    from .test_network import plain_vgg16

    torch.manual_seed(0)
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    vgg = plain_vgg16().state_dict()
    torch.save(vgg, home / "hub" / "checkpoints" / "vgg16-397923af.pth")
    # the bundle's own network definition, with the override a user gives on the command line
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["network_def#pretrained"] = str(home / "hub" / "checkpoints" / "vgg16-397923af.pth")
    net = parser.get_parsed_content("network_def")
    expected = vgg16_to_fcn(vgg, in_channels=1)
    for key in ("features.0.weight", "features.28.weight", "fc6.0.weight", "fc7.0.bias"):
        assert torch.equal(net.state_dict()[key], expected[key]), key
    assert torch.count_nonzero(net.score_fr.weight) == 0  # the score layers keep their zero start
    # the command line: True finds the file in $TORCH_HOME; a missing file or a narrow network is refused
    base = [
        "--config_file",
        str(CONFIGS / "train.json"),
        "--dataset_dir",
        str(prepared),
        "--output_dir",
        str(tmp_path / "eval"),
        "--ckpt_dir",
        str(tmp_path / "models"),
    ]
    ok = bundle("run", "network_def", *base, "--network_def#pretrained", "True", env={"TORCH_HOME": str(home)})
    assert ok.returncode == 0, ok.stderr[-2000:]
    missing = bundle(
        "run", "training", *base, *tiny_overrides(width=1.0), "--network_def#pretrained", str(tmp_path / "absent.pth")
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'absent.pth'}: VGG16 weight file does not exist"
    )
    narrow = bundle(
        "run", "training", *base, *tiny_overrides(), "--network_def#pretrained", "True", env={"TORCH_HOME": str(home)}
    )
    assert narrow.returncode != 0 and "ImageNet VGG16 weights need width=1.0" in narrow.stderr
    assert not (tmp_path / "eval").exists() and not (tmp_path / "models").exists()  # nothing written
