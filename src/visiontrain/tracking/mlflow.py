"""MLflow: params, per-step metrics and the run's files in an MLflow tracking store.

Optional (``pip install 'visiontrain[mlflow]'``) and off unless ``mlflow`` is in
``run.loggers``. ``mlflow`` is imported only when the logger is built, so runs without it
never pay for the import.

Store: ``run.mlflow_uri`` is any MLflow tracking URI (``sqlite:///path/mlflow.db``,
``http://host:5000``, ``file:/path`` ...). Unset, it is the SQLite database
``<run.dir>/mlflow.db`` with artifacts under ``<run.dir>/mlartifacts``, next to the runs.
MLflow 3 refuses its plain-folder store (``./mlruns``) unless ``MLFLOW_ALLOW_FILE_STORE=true``
is set, so the default is the database backend MLflow recommends.

Experiment: ``run.mlflow_experiment``, else ``visiontrain-<task>-<data.name>``; the MLflow run
is named after the run folder. A resumed visiontrain run continues the same MLflow run: its
id is in this callback's state (saved in every checkpoint), and a run that died before its
first checkpoint is found again by its ``visiontrain.run_dir`` tag.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontrain.config import Config, all_keys
from visiontrain.engine.callbacks import Callback
from visiontrain.errors import ConfigError
from visiontrain.rundir import (
    BEST_CHECKPOINT,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    PLOTS_DIR,
    REPORT_FILE,
    SUMMARY_FILE,
)
from visiontrain.version import __version__

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from visiontrain.engine.trainer import Trainer

INSTALL_HINT = "pip install 'visiontrain[mlflow]'"
RUN_DIR_TAG = "visiontrain.run_dir"
# Record fields that are bookkeeping, not measurements.
_SKIP = {"step", "epoch", "split", "kind", "time", "hparams", "samples"}
# Buffered metrics are sent when this many are waiting or this much time has passed: one
# request per interval instead of one per number, while the UI still follows the run live.
FLUSH_METRICS = 500
FLUSH_SECONDS = 10.0


def require_mlflow() -> None:
    """Import the MLflow client, or explain how to install it.

    Raises:
        ConfigError: ``mlflow`` (``mlflow-skinny`` is enough) is not importable.
    """
    try:
        import mlflow.tracking  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"run.loggers includes mlflow but MLflow is not installed ({err}). Install it "
            f"with `{INSTALL_HINT}`, or drop mlflow from run.loggers."
        ) from None


def tracking_target(cfg: Config) -> tuple[str, str | None]:
    """The tracking URI and, for a local SQLite store, the artifact folder of new experiments.

    Without an artifact location MLflow would put a SQLite store's artifacts in
    ``./mlartifacts`` of whatever the working directory is; next to the database is where
    one looks for them. A server or a folder store decides its artifact location itself.
    """
    uri = cfg.run.mlflow_uri
    if uri is None:
        db = (Path(cfg.run.dir).expanduser() / "mlflow.db").resolve()
        return f"sqlite:///{db}", str(db.parent / "mlartifacts")
    prefix = "sqlite:///"
    if uri.startswith(prefix) and len(uri) > len(prefix):
        db = Path(uri[len(prefix) :]).expanduser().resolve()
        return uri, str(db.parent / "mlartifacts")
    return uri, None


def experiment_name(cfg: Config) -> str:
    """``run.mlflow_experiment``, else ``visiontrain-<task>-<data.name>``.

    The task is part of the name because tasks log different metrics, and MLflow compares
    the runs of one experiment column by column.
    """
    return cfg.run.mlflow_experiment or f"visiontrain-{cfg.task}-{cfg.data.name}"


def config_params(cfg: Config) -> dict[str, str]:
    """The config as MLflow params: one per dotted key, values as text, cut to MLflow's limit.

    Only config sections are flattened; a key whose value is a mapping (``tune.space``,
    ``loss.term_weights``) stays one param holding JSON, as it is one setting.
    """
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    keys = all_keys()
    sections = {k for k in keys if any(other.startswith(k + ".") for other in keys)}
    out: dict[str, str] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for name, value in tree.items():
            key = f"{prefix}{name}"
            if key in sections and isinstance(value, dict):
                walk(value, key + ".")
            else:
                text = value if isinstance(value, str) else json.dumps(value)
                out[key] = text[:MAX_PARAM_VAL_LENGTH]

    walk(cfg.to_dict(), "")
    return out


def record_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics record, named as in TensorBoard.

    A training interval gives ``train/loss``, ``train/loss_<term>``, ``train/lr``,
    ``train/grad_norm`` and ``train/samples_per_s``; an epoch ``train/epoch_loss`` and
    ``train/epoch_samples_per_s``; an evaluation ``val/<metric>`` or ``test/<metric>`` for
    each headline number (per-class tables stay in metrics.jsonl); the val metrics after
    a threshold is tuned ``val_calibrated/<metric>``.
    """
    split = record.get("split", "train")
    kind = record.get("kind")
    if kind in ("train_step", "eval"):
        prefix = f"{split}/"
    elif kind == "train_epoch":
        prefix = f"{split}/epoch_"
    else:
        prefix = f"{split}_{kind}/"
    out: dict[str, float] = {}
    for key, value in record.items():
        # bool is an int, and a flag such as `improved` is not a measurement.
        if key in _SKIP or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[prefix + key] = float(value)
    return out


@contextmanager
def _quiet_store_setup() -> Iterator[None]:
    # Creating a SQLite store logs its schema migration at INFO on stderr, every new file.
    log = logging.getLogger("mlflow.store.db.utils")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


class MlflowLogger(Callback):
    """Logs the run to MLflow: params at the start, metrics as they come, files at the end.

    Args:
        cfg: the resolved config (params, store, experiment).
        run_dir: the run folder; its name becomes the MLflow run name.
        connect: open the store and find or create the experiment now, so that a store
            that cannot be opened stops the command before the run folder is written.
            ``False`` for ``--check``, which must write nothing (a new SQLite store is a
            file).

    Raises:
        ConfigError: MLflow is not installed, the store cannot be opened, or the
            experiment was deleted.
    """

    name = "mlflow"

    def __init__(self, cfg: Config, run_dir: Path, connect: bool = True) -> None:
        require_mlflow()
        self.cfg = cfg
        self.run_dir = run_dir
        self.uri, self.artifact_location = tracking_target(cfg)
        self.experiment = experiment_name(cfg)
        self.client: MlflowClient | None = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()
        # Highest step already in the store per metric (a resumed run): see `on_log`.
        self._logged_up_to: dict[str, int] = {}
        self._finished = False
        self._closed = False
        self._warned = False
        if connect:
            self.connect()

    # ------------------------------------------------------------------ store

    def connect(self) -> None:
        """Open the tracking store and find or create the experiment.

        Raises:
            ConfigError: the store cannot be opened, or the experiment is deleted.
        """
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if self.cfg.run.mlflow_uri is None:
            # The default database lives in run.dir, which may not exist yet.
            Path(self.cfg.run.dir).expanduser().mkdir(parents=True, exist_ok=True)
        try:
            with _quiet_store_setup():
                client = MlflowClient(tracking_uri=self.uri)
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    try:
                        self.experiment_id = client.create_experiment(
                            self.experiment, artifact_location=self.artifact_location
                        )
                    except MlflowException:
                        # Another process created it between the lookup and the create.
                        experiment = client.get_experiment_by_name(self.experiment)
                        if experiment is None:
                            raise
        except Exception as err:  # any backend: MLflow, SQLAlchemy, HTTP, filesystem
            raise ConfigError(
                f"run.mlflow_uri={self.uri}: cannot open the MLflow tracking store: "
                f"{str(err).strip()}"
            ) from err
        if experiment is not None:
            if experiment.lifecycle_stage != "active":
                raise ConfigError(
                    f"MLflow experiment `{self.experiment}` in {self.uri} is deleted; restore "
                    "it (`mlflow experiments restore`) or set run.mlflow_experiment to another "
                    "name."
                )
            self.experiment_id = experiment.experiment_id
        self.client = client

    def _resumable_run(self) -> str | None:
        """The MLflow run to continue: the checkpointed id, else the one tagged with this folder."""
        from mlflow.exceptions import MlflowException

        assert self.client is not None
        if self.run_id is not None:
            try:
                run = self.client.get_run(self.run_id)
            except MlflowException:
                run = None  # the checkpoint came from another store; start a run here
            if run is not None and run.info.lifecycle_stage == "active":
                return self.run_id
            return None
        if self.cfg.run.resume is None:
            return None
        # Single quotes in a path would end MLflow's filter string; such a path gets a new run.
        folder = str(self.run_dir.resolve())
        if "'" in folder:
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{RUN_DIR_TAG}` = '{folder}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: Trainer) -> None:
        """Create or continue the MLflow run and log the config as params."""
        from mlflow.entities import Param

        if self.client is None:
            self.connect()
        assert self.client is not None and self.experiment_id is not None
        run_id = self._resumable_run()
        existing: dict[str, str] = {}
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.run_dir.name,
                tags={
                    RUN_DIR_TAG: str(self.run_dir.resolve()),
                    "visiontrain.task": self.cfg.task,
                    "visiontrain.data": self.cfg.data.name,
                    "visiontrain.version": __version__,
                },
            )
            self.run_id = run.info.run_id
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            existing = self.client.get_run(run_id).data.params
            for key in self.client.get_run(run_id).data.metrics:
                history = self.client.get_metric_history(run_id, key)
                self._logged_up_to[key] = max(m.step for m in history)
        # A param cannot change once logged; a resumed run keeps the values it started with
        # (config.yaml, logged at the end, holds the config the run finished with).
        params = [Param(k, v) for k, v in config_params(self.cfg).items() if k not in existing]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Buffer the record's numbers; send them when enough are waiting."""
        from mlflow.entities import Metric

        step = int(record["step"])
        stamp = int(time.time() * 1000)
        for key, value in record_metrics(record).items():
            # MLflow cannot delete logged points: steps an interrupted attempt logged after
            # its last checkpoint run again on resume, and keep their first value.
            if step <= self._logged_up_to.get(key, -1):
                continue
            self._buffer.append(Metric(key, value, stamp, step))
        waited = time.monotonic() - self._last_flush
        if len(self._buffer) >= FLUSH_METRICS or waited >= FLUSH_SECONDS:
            self.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        """Mark the fit finished: :meth:`close` then uploads the run's files."""
        self._finished = True
        self.flush()

    def state_dict(self) -> dict[str, Any]:
        """The MLflow run id; sends the buffered metrics first.

        Called as a checkpoint is written, so every step up to the checkpoint is in the
        store before a resume from it could need it.
        """
        self.flush()
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Remember the MLflow run of the checkpoint, continued in :meth:`on_fit_start`."""
        self.run_id = state.get("run_id")

    def close(self) -> None:
        """Send what is buffered; after a finished fit upload the files; end the MLflow run.

        An interrupted run ends as ``KILLED`` and becomes ``RUNNING`` again when resumed.
        A failure here is a warning: training is over and its files are on disk.
        """
        if self._closed or self.client is None or self.run_id is None:
            return
        self._closed = True
        self.flush()
        try:
            if self._finished:
                self._log_artifacts()
            self.client.set_terminated(self.run_id, "FINISHED" if self._finished else "KILLED")
        except Exception as err:  # the store's failure must not hide the run's result
            warnings.warn(f"MLflow: could not finish run {self.run_id}: {err}", stacklevel=2)

    # ------------------------------------------------------------------ internals

    def flush(self) -> None:
        """Send the buffered metrics in batches; on failure keep them for the next try."""
        self._last_flush = time.monotonic()
        if not self._buffer or self.client is None or self.run_id is None:
            return
        try:
            while self._buffer:
                # At most 1000 metrics per batch (MLflow's limit).
                self.client.log_batch(self.run_id, metrics=self._buffer[:1000])
                del self._buffer[:1000]
        except Exception as err:  # a tracking server outage should not stop training
            if not self._warned:
                warnings.warn(
                    f"MLflow: could not log metrics to {self.uri} ({err}); will retry",
                    stacklevel=2,
                )
                self._warned = True

    def _log_artifacts(self) -> None:
        assert self.client is not None and self.run_id is not None
        run_dir = self.run_dir
        for name in (CONFIG_FILE, SUMMARY_FILE, REPORT_FILE):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / PLOTS_DIR).is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / PLOTS_DIR), PLOTS_DIR)
        # The weights predict/eval read: best.pt, or last.pt when no evaluation improved.
        for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
            path = run_dir / CHECKPOINTS_DIR / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), CHECKPOINTS_DIR)
                break


def build_mlflow_logger(cfg: Config, run_dir: Path, connect: bool) -> MlflowLogger | None:
    """The MLflow logger when ``mlflow`` is in ``run.loggers``, else ``None``.

    Args:
        cfg: the resolved config.
        run_dir: the run folder (it need not exist yet).
        connect: open the store now (see :class:`MlflowLogger`).

    Raises:
        ConfigError: MLflow is not installed, or the store cannot be opened.
    """
    if "mlflow" not in cfg.run.loggers:
        return None
    return MlflowLogger(cfg, run_dir, connect=connect)
