"""An MLflow run that outlives its tracking server.

When the tracking server a training records to stops answering mid-run, the training goes on: what
the run would have sent (metrics, parameters, tags, artifacts, its end status, the model to log) is
appended to ``<offline_dir>/<run id>/records.jsonl`` (artifacts copied beside it). The records are
sent, in order, as soon as the server answers again (checked at most every ``retry_every`` seconds,
at the run's next write), or later with ``liver-fcn sync FOLDER``. Records already sent are counted
in ``sent``, so an interrupted sync goes on where it stopped.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from liver_fcn.errors import InputError
from liver_fcn.outputs import write_text_atomic
from liver_fcn.reporting import plot_curves
from liver_fcn.runs import run_curves, server_unreachable

__all__ = ["OfflineClient", "RunRecords", "sync"]

logger = logging.getLogger(__name__)

RECORDS, SENT, STORE = "records.jsonl", "sent", "store"

#: the client calls that write to a run; any other call goes straight to the client
WRITES = ("log_batch", "set_tag", "log_artifact", "set_terminated")


class RunRecords:
    """The records of one run kept while its tracking server is away (a folder ``<root>/<run id>``)."""

    def __init__(self, root: str | os.PathLike, run_id: str, tracking_uri: str) -> None:
        self.folder = Path(root) / run_id
        self.run_id, self.tracking_uri = run_id, tracking_uri

    @classmethod
    def open(cls, folder: str | os.PathLike) -> RunRecords:
        folder = Path(folder)
        if not (folder / RECORDS).is_file():
            raise InputError(f"{folder}: no MLflow records to send (no {RECORDS})")
        records = cls(folder.parent, folder.name, (folder / STORE).read_text().strip())
        return records

    def add(self, op: str, **fields) -> None:
        """Append one record; an artifact's file is copied into the folder first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / STORE).is_file():
            write_text_atomic(self.folder / STORE, self.tracking_uri + "\n")
        if op == "log_artifact":
            n = len(self.records())
            copy = self.folder / "artifacts" / str(n) / Path(fields["local_path"]).name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(fields["local_path"], copy)
            fields["local_path"] = str(copy.relative_to(self.folder))
        with open(self.folder / RECORDS, "a") as f:
            f.write(json.dumps({"op": op, **fields}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        path = self.folder / RECORDS
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []

    def sent(self) -> int:
        path = self.folder / SENT
        return int(path.read_text()) if path.is_file() else 0

    def pending(self) -> int:
        return len(self.records()) - self.sent()

    def send(self, client) -> int:
        """Send the records not yet sent, in order, through ``client`` (an ``MlflowClient``); the
        folder is removed once all are sent. Returns how many were sent."""
        if not self.folder.is_dir():
            return 0
        records, done = self.records(), self.sent()
        for i in range(done, len(records)):
            _replay(client, self.tracking_uri, self.run_id, self.folder, records[i])
            write_text_atomic(self.folder / SENT, str(i + 1))
        shutil.rmtree(self.folder)
        return len(records) - done


def _replay(client, tracking_uri: str, run_id: str, folder: Path, record: dict) -> None:
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "log_batch":
        client.log_batch(
            run_id,
            metrics=[Metric(*m) for m in record["metrics"]],
            params=[Param(*p) for p in record["params"]],
            tags=[RunTag(*t) for t in record["tags"]],
        )
    elif op == "set_tag":
        client.set_tag(run_id, record["key"], record["value"])
    elif op == "log_artifact":
        client.log_artifact(run_id, str(folder / record["local_path"]), record.get("artifact_path"))
    elif op == "set_terminated":
        client.set_terminated(run_id, record["status"], record["end_time"])
    elif op == "curves":
        run = client.get_run(run_id)
        curves = run_curves(client, run_id)
        if any(curves.values()):
            with tempfile.TemporaryDirectory() as tmp:
                png = plot_curves({run.info.run_name: curves}, Path(tmp) / "learning_curves.png", title=record["title"])
                client.log_artifact(run_id, str(png), "plots")
    elif op == "description":
        module, _, name = record["function"].partition(":")
        describe = getattr(importlib.import_module(module), name)
        client.set_tag(run_id, "mlflow.note.content", describe(client, client.get_run(run_id)))
    elif op == "log_model":
        from liver_fcn.registry import log_model

        log_model(
            tracking_uri,
            run_id,
            record["checkpoint"],
            record["registered_model_name"],
            configs_dir=record["configs_dir"],
        )
    else:
        raise InputError(f"{folder / RECORDS}: unknown record {op!r}")


def _as_record(op: str, args: tuple, kwargs: dict) -> dict:
    """A write call of ``MlflowClient`` as a JSON record (the run id is the folder's)."""
    names = {
        "log_batch": ("run_id", "metrics", "params", "tags"),
        "set_tag": ("run_id", "key", "value"),
        "log_artifact": ("run_id", "local_path", "artifact_path"),
        "set_terminated": ("run_id", "status", "end_time"),
    }[op]
    given = dict(zip(names, args))
    given.update(kwargs)
    given.pop("run_id", None)
    given.pop("synchronous", None)
    if op == "log_batch":
        given["metrics"] = [[m.key, m.value, m.timestamp, m.step] for m in given.get("metrics") or []]
        given["params"] = [[p.key, p.value] for p in given.get("params") or []]
        given["tags"] = [[t.key, t.value] for t in given.get("tags") or []]
    elif op == "set_tag":
        given["value"] = str(given["value"])
    elif op == "set_terminated":
        given.setdefault("status", "FINISHED")
        given["end_time"] = given.get("end_time") or int(time.time() * 1000)
    return given


class OfflineClient:
    """An ``MlflowClient`` of one run whose writes survive the tracking server going away.

    A write that fails while the server does not answer its ``/health`` switches the run to its
    records (one warning); later writes go to the records, and the first write after ``retry_every``
    seconds in which the server answers again sends them all and switches back. Reads while offline
    answer from the last ``get_run`` (the parameters a handler checks), or raise. A failure while the
    server answers is raised as it came. Stores that are not servers are passed through untouched.
    """

    _live: dict[tuple[str, str], OfflineClient] = {}

    def __init__(self, client, run_id: str, records: RunRecords, retry_every: float = 30.0, on_lost=None) -> None:
        self._client, self.run_id, self.records = client, run_id, records
        self.retry_every, self.on_lost = float(retry_every), on_lost
        self.tracking_uri = records.tracking_uri
        self._last_try = 0.0
        self._run = None
        self.offline = records.pending() > 0  # a resumed run's records go first
        if self.offline:
            self.reconnect(force=True)

    @classmethod
    def of(cls, client, run_id: str, offline_dir: str | os.PathLike, tracking_uri: str, **kwargs) -> OfflineClient:
        """The one OfflineClient of a run in this process (a trainer's and its validator's handlers share
        it, so the run goes offline and back once)."""
        key = (tracking_uri, run_id)
        if key not in cls._live:
            cls._live[key] = cls(client, run_id, RunRecords(offline_dir, run_id, tracking_uri), **kwargs)
        return cls._live[key]

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if name in WRITES:
            return lambda *args, **kwargs: self._write(name, attr, args, kwargs)
        if name == "get_run":
            return self._get_run
        if self.offline:
            raise ConnectionError(f"{self.tracking_uri}: the tracking server is away ({name} not answered)")
        return attr

    def _get_run(self, run_id: str):
        if not self.offline:
            try:
                self._run = self._client.get_run(run_id)
                return self._run
            except Exception:
                if not self._lost():
                    raise
        if self._run is None:
            raise ConnectionError(f"{self.tracking_uri}: the tracking server is away")
        return self._run

    def _write(self, op: str, call, args: tuple, kwargs: dict):
        if self.offline and not self.reconnect():
            self.records.add(op, **_as_record(op, args, kwargs))
            return None
        try:
            return call(*args, **kwargs)
        except Exception:
            if not self._lost():
                raise
            self.records.add(op, **_as_record(op, args, kwargs))
            return None

    def record(self, op: str, **fields) -> None:
        """Keep a step that needs the server (``curves``, ``description``, ``log_model``) for later."""
        self.records.add(op, **fields)

    def _lost(self) -> bool:
        """After a failed write: is the server away? If so, the run records offline from now on."""
        reason = server_unreachable(self.tracking_uri, timeout=5.0)
        if reason is None:
            return False
        self.offline, self._last_try = True, time.monotonic()
        if self.on_lost is not None:
            self.on_lost()
        logger.warning(
            f"MLflow tracking server {self.tracking_uri} unreachable ({reason}): training goes on; run "
            f"{self.run_id}'s records are kept in {self.records.folder} and sent when the server answers "
            f"again (or with: liver-fcn sync {self.records.folder})"
        )
        return True

    def reconnect(self, force: bool = False) -> bool:
        """Send the kept records if the server answers again; True when the run is back online."""
        if not self.offline:
            return True
        now = time.monotonic()
        if not force and now - self._last_try < self.retry_every:
            return False
        self._last_try = now
        if server_unreachable(self.tracking_uri, timeout=2.0) is not None:
            return False
        try:
            n = self.records.send(self._client)
        except Exception as e:  # the server went again mid-send: what was sent is counted
            logger.warning(f"sending {self.records.folder} to {self.tracking_uri} stopped: {e}")
            return False
        self.offline = False
        logger.info(f"MLflow tracking server {self.tracking_uri} answers again: {n} kept records sent")
        return True


def sync(folders: list[str | os.PathLike], tracking_uri: str | None = None, log=print) -> int:
    """Send the records of each folder (``<offline_dir>/<run id>``, or ``<offline_dir>`` for all its
    runs) to their tracking server (or ``tracking_uri``); returns the number of records sent."""
    import mlflow

    runs = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder")
        inner = sorted(p for p in folder.iterdir() if (p / RECORDS).is_file())
        runs.extend(RunRecords.open(p) for p in (inner if not (folder / RECORDS).is_file() else [folder]))
    if not runs:
        raise InputError(f"{', '.join(map(str, folders))}: no MLflow records to send")
    total = 0
    for records in runs:
        uri = tracking_uri or records.tracking_uri
        reason = server_unreachable(uri)
        if reason is not None:
            raise InputError(f"{uri}: MLflow tracking server unreachable ({reason}); nothing sent")
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            client.get_run(records.run_id)
        except mlflow.exceptions.MlflowException:
            raise InputError(f"{records.folder}: run {records.run_id} is not in {uri}; nothing sent") from None
        records.tracking_uri = uri
        n = records.send(client)
        total += n
        log(f"run {records.run_id}: {n} records sent to {uri}")
    return total
