"""The MLflow run of a bundle training or evaluation (see :mod:`liver_fcn.tracking` for what it logs)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from liver_fcn.errors import root_cause
from liver_fcn.handlers.termination import termination_held
from liver_fcn.offline import OfflineClient
from liver_fcn.reporting import plot_curves  # matplotlib: loaded when a run completes
from liver_fcn.runs import (
    run_curves,
    sqlite_dir,
    tag_experiment,
)
from liver_fcn.tracking import (
    config_values,
    provenance_tags,
    training_params,
)

__all__ = ["MLflowRunHandler"]

logger = logging.getLogger(__name__)


def _held(method):
    """Run an MLflow-writing event handler with SIGTERM held (:func:`termination_held`): a training
    stopped in the middle of a write stops after it, never inside the tracking store's transaction."""

    @functools.wraps(method)
    def held(self, *args, **kwargs):
        with termination_held():
            return method(self, *args, **kwargs)

    return held


class MLflowRunHandler(MLFlowHandler):
    """MLFlowHandler that marks a crashed run FAILED and tags the run.

    Its event handlers hold SIGTERM while they write (:func:`~liver_fcn.handlers.termination_held`):
    a training stopped mid-write raises ``TrainingTerminated`` once the write is done, and the run is
    then marked FAILED on a store that is not left in the middle of a transaction.

    Every experiment it creates or writes to is tagged as model training for MLflow 3's UI
    (:data:`EXPERIMENT_KIND`).

    Args:
        tags: run tags set at start (``{"variant": "8s", ...}``); None values are left out, so
            ``"mlflow.parentRunId": null`` makes a top-level run and a run id a child run.
        provenance: tag the run with its command, user, git commit and versions (:func:`provenance_tags`).
        dataset: an MLflow dataset (:func:`dataset_input`), or a list of them (the data set and each
            extra training set, :func:`training_datasets`), logged as the run's training inputs.
        log_file: a file the process's log also goes to while the engine runs; logged under ``logs/``.
        system_metrics: log CPU, memory (and GPU, where MLflow can read it) every 10 s.
        best_metrics: on a validation engine, log ``best_<metric>`` and ``best_iteration`` whenever
            the key metric improves (the best checkpoint is saved on the same event) and tag the run
            with the checkpoint it now holds.
        description: a callable ``(client, run) -> str`` for the run's description, set on completion.
        engine_params: on a trainer, also log what :func:`training_params` reads from the engine
            (optimizer, budget, batch, loss, augmentations, data size, device, precision).
        config_params: parameters read from the config being run, ``{"seed": "seed", "dataset":
            "datalist"}`` (parameter name: config id; objects are logged as their ``str``).
        curves: on completion, log the run's validation curves as ``plots/learning_curves.png``.
        plots: image files to log under ``plots/`` on completion (those that exist then).
        model_checkpoint: a checkpoint to log as the run's MLflow model when the engine completes
            (see :mod:`liver_fcn.registry`); None logs no model.
        registered_model_name: register that model as a new version of this name (None: log only).
        configs_dir: the bundle's ``configs/`` folder, whose configs the logged model carries
            (default: the source checkout's bundle).
        offline_dir: for a tracking server (``http(s)://``): where the run's records are kept if the
            server stops answering mid-run (:mod:`liver_fcn.offline`); the run goes on, the records
            are sent when the server is back (tried every ``retry_every`` seconds at the next write)
            or with ``liver-fcn sync``. None: a lost server fails the run as MLflow does.
        retry_every: seconds between two tries of a lost server.
        kwargs: MLFlowHandler arguments (``tracking_uri``, ``experiment_name``, ``run_name``,
            ``experiment_param``, ``artifacts``, ``close_on_complete`` ...).
    """

    def __init__(
        self,
        tags: Mapping[str, object] | None = None,
        model_checkpoint: str | os.PathLike | None = None,
        registered_model_name: str | None = None,
        provenance: bool = False,
        dataset=None,
        log_file: str | os.PathLike | None = None,
        system_metrics: bool = False,
        best_metrics: bool = False,
        description=None,
        curves: bool = False,
        plots: Sequence[str | os.PathLike] = (),
        configs_dir: str | os.PathLike | None = None,
        engine_params: bool = False,
        config_params: Mapping[str, str] | None = None,
        offline_dir: str | os.PathLike | None = None,
        retry_every: float = 30.0,
        **kwargs,
    ) -> None:
        uri = kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""
        folder = sqlite_dir(uri)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        super().__init__(**kwargs)
        self.uri = uri
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v is not None and str(v) not in ("", "None")}
        self.model_checkpoint = model_checkpoint
        self.configs_dir = configs_dir
        self.engine_params, self.config_params = bool(engine_params), dict(config_params or {})
        self.registered_model_name = (
            registered_model_name if registered_model_name not in ("", "None", "null") else None
        )
        self.provenance, self.dataset, self.log_file = bool(provenance), dataset, log_file
        self.system_metrics, self.best_metrics, self.description = bool(system_metrics), bool(best_metrics), description
        self.curves, self.plots = bool(curves), [p for p in plots if p]
        self.offline_dir, self.retry_every = offline_dir, float(retry_every)
        self._log_handler: logging.Handler | None = None
        self._monitor = None
        self._started: str | None = None

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if not engine.has_event_handler(self.failed, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    @_held
    def start(self, engine: Engine) -> None:
        if self.engine_params or self.config_params:
            params = dict(self.experiment_param or {})
            if self.config_params:
                params.update(config_values(self.config_params))
            if self.engine_params:
                params.update(training_params(engine))
            if "pixel_spacing" in params and "image_size" in params:
                params["field_of_view"] = float(params["pixel_spacing"]) * int(params["image_size"])
            self.experiment_param = params
        super().start(engine)
        if self.cur_run is None:
            return
        run_id = self.cur_run.info.run_id
        server = self.uri.startswith(("http://", "https://"))
        if self.offline_dir and server and not isinstance(self.client, OfflineClient):
            self.client = OfflineClient.of(
                self.client,
                run_id,
                self.offline_dir,
                self.uri,
                retry_every=self.retry_every,
                on_lost=self._stop_monitor,
            )
        if self._started == run_id:  # a validator starts every period: tag and set up once
            return
        self._started = run_id
        tag_experiment(self.client, self.cur_run.info.experiment_id)
        tags = dict(self.tags)
        if self.provenance:
            tags.update(provenance_tags())
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        if self.dataset is not None and not self.client.get_run(run_id).inputs.dataset_inputs:
            from mlflow.entities import DatasetInput, InputTag

            datasets = self.dataset if isinstance(self.dataset, (list, tuple)) else [self.dataset]
            self.client.log_inputs(
                run_id, [DatasetInput(d, [InputTag("mlflow.data.context", "training")]) for d in datasets]
            )
        if self.log_file:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
            self._log_handler = logging.FileHandler(self.log_file)
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
            logging.getLogger().addHandler(self._log_handler)
        if self.system_metrics and self._monitor is None:
            self._monitor = _system_monitor(run_id, self.uri or self.client.tracking_uri)

    iteration_completed = _held(MLFlowHandler.iteration_completed)

    @_held
    def epoch_completed(self, engine: Engine) -> None:
        super().epoch_completed(engine)
        state = engine.state
        if not (self.best_metrics and self.cur_run is not None and getattr(state, "key_metric_name", None)):
            return
        if state.best_metric_epoch != state.epoch:
            return
        step = int(self.global_epoch_transform(state.epoch))
        best = {
            f"best_{k}": float(v)
            for k, v in state.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        best["best_iteration"] = float(step)
        self._log_metrics(best, step=step)
        self.client.set_tag(
            self.cur_run.info.run_id,
            "best_checkpoint",
            f"model.pt = the validation at iteration {step}: {state.key_metric_name} {float(state.best_metric):.4f}",
        )

    def _log_params(self, params: dict) -> None:
        """Log parameters not yet in the run; a changed value (a resumed run with, say, more epochs)
        is recorded as a ``changed_param.<name>`` tag instead of failing as MLflow would."""
        if not self.cur_run:
            raise ValueError("Current Run is not Active to log params")
        existing = self.client.get_run(self.cur_run.info.run_id).data.params
        fresh = {}
        for k, v in params.items():
            value = str(v)
            if k not in existing:
                fresh[k] = value
            elif existing[k] != value[:6000]:
                self.client.set_tag(self.cur_run.info.run_id, f"changed_param.{k}", value[:5000])
        if fresh:
            super()._log_params(fresh)

    @_held
    def complete(self) -> None:
        """Log the artifacts, then - with ``model_checkpoint`` - the checkpoint as the run's MLflow
        model, registered as a new version of ``registered_model_name`` when one is given."""
        self._stop_side_logging()
        offline = isinstance(self.client, OfflineClient) and self.close_on_complete and not self.client.reconnect(True)
        if self.cur_run is not None and self.log_file and Path(self.log_file).is_file():
            self.client.log_artifact(self.cur_run.info.run_id, str(self.log_file), "logs")
        if self.cur_run is not None and self.curves:
            if offline:
                self.client.record("curves", title=f"{self.cur_run.info.run_name}: validation")
            else:
                self._log_curves()
        for plot in self.plots if self.cur_run is not None else []:
            if Path(plot).is_file():
                self.client.log_artifact(self.cur_run.info.run_id, str(plot), "plots")
        if self.cur_run is not None and self.description is not None:
            if offline:
                function = f"{self.description.__module__}:{self.description.__qualname__}"
                self.client.record("description", function=function)
            else:
                run = self.client.get_run(self.cur_run.info.run_id)
                self.client.set_tag(run.info.run_id, "mlflow.note.content", self.description(self.client, run))
        super().complete()
        if offline and self.cur_run is not None and self.model_checkpoint and Path(self.model_checkpoint).is_file():
            self.client.record(
                "log_model",
                checkpoint=str(Path(self.model_checkpoint).resolve()),
                registered_model_name=self.registered_model_name,
                configs_dir=str(self.configs_dir) if self.configs_dir else None,
            )
        elif self.cur_run is not None and self.model_checkpoint and Path(self.model_checkpoint).is_file():
            # here: the registry defines MLflow's pyfunc class, whose definition makes MLflow warn, and the
            # package's handlers are imported by inference too (its progress bar), which registers nothing
            from liver_fcn.registry import log_model

            info = log_model(
                self.uri or self.client.tracking_uri,
                self.cur_run.info.run_id,
                self.model_checkpoint,
                self.registered_model_name,
                configs_dir=self.configs_dir,
            )
            version = getattr(info, "registered_model_version", None)
            if version is not None:
                logger.info(f"registered {self.model_checkpoint} as models:/{self.registered_model_name}/{version}")

    def _log_curves(self) -> None:
        """The run's validation curves as ``plots/learning_curves.png`` (when it validated at all)."""
        run_id = self.cur_run.info.run_id
        curves = run_curves(self.client, run_id)
        if not any(curves.values()):
            return
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_curves(
                {self.cur_run.info.run_name: curves},
                Path(tmp) / "learning_curves.png",
                title=f"{self.cur_run.info.run_name}: validation",
            )
            self.client.log_artifact(run_id, str(png), "plots")

    @_held
    def close(self) -> None:
        """End the run (FINISHED); if its server is away, say where its records wait."""
        client = self.client
        super().close()
        _say_where_records_wait(client)

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            finally:
                self._monitor = None

    def _stop_side_logging(self) -> None:
        self._stop_monitor()
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def failed(self, engine: Engine, e: BaseException) -> None:
        """Mark the run FAILED (with the error as a tag), then let the exception go on."""
        with termination_held(raise_after=False):  # a second SIGTERM: the run is failing already
            self._stop_side_logging()
            if self.cur_run is not None:
                run_id = self.cur_run.info.run_id
                root = root_cause(e)  # MONAI wraps what a transform raises: report the original cause
                message = f"{type(root).__name__}: {root}"
                message += f" (in {type(e).__name__}: {e})" if root is not e else ""
                try:
                    self.client.set_tag(run_id, "error", message[:4000])
                    self.client.set_terminated(run_id, "FAILED")
                finally:
                    self.cur_run = None
                    self._dispose_sqlite_store()
                    _say_where_records_wait(self.client)
        raise e


def _say_where_records_wait(client) -> None:
    """At a run's end: if its tracking server is away, where its records wait and how to send them."""
    if isinstance(client, OfflineClient) and client.offline:
        logger.warning(
            f"MLflow tracking server {client.tracking_uri} did not come back: the end of run {client.run_id} "
            f"({client.records.pending()} records) is kept in {client.records.folder}; send it with: "
            f"liver-fcn sync {client.records.folder}"
        )


def _system_monitor(run_id: str, tracking_uri: str):
    """MLflow's system-metrics monitor for ``run_id`` (CPU, memory, disk, network; GPU with pynvml),
    sampling every 10 s; None where psutil is missing."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None

    if importlib.util.find_spec("psutil") is None:  # what the monitor reads the machine with
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=1, tracking_uri=tracking_uri)
    monitor.start()
    return monitor
