"""Everything MLflow: where runs are stored, the tracker the driver and the rank-0 worker log through, run tags,
the headline metrics parent runs repeat from their stage runs, system metrics, data fingerprints, and redaction
of secrets before anything is logged.

mlflow is imported only when a :class:`Tracker` is made, so importing owl2 stays cheap and processes that
never log (workers of rank > 0, the CLI) never pay for it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import owl2
from owl2.config import ConfigError, SourceConfig, TrackingConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_RUN_TAG = "mlflow.parentRunId"
REDACTED = "***"
# The MLflow UI shows an experiment either as model training (runs table, metric charts) or as GenAI development
# (traces, sessions). Its experiment-kind selector keeps the choice in this experiment tag; MLflow 3.18's UI
# decides by a GenAI / Model training switch per browser instead (GenAI unless the link says otherwise, see
# experiment_url), so owl2 sets both where it can.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# The runs table shows no metric or param column until someone picks them. A view shared from the UI is an
# experiment tag (this prefix + its key) holding the table's settings; experiment_url opens owl2's own, whose
# columns are the metrics and params that compare runs (Tracker.show_columns).
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "owl2"
WALL_TIME = "wall_time_s"
# What a parent run repeats of each stage run: the final loss, val_loss and wall time, and the stage's eval scores
# (``eval/<suite metric>``, owl2.train.evaluate's names) but not the time the evaluation took.
_HEADLINE = frozenset({"loss", "val_loss", WALL_TIME})
_EVAL_PREFIX, _EVAL_TIME = "eval/", "eval/time_s"

# MLflow's own limits, used when mlflow cannot tell us (it is imported lazily).
_FALLBACK_PARAM_LENGTH = 500
_FALLBACK_TAG_LENGTH = 5000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


# --------------------------------------------------------------------------------------------------
# Where runs are stored
# --------------------------------------------------------------------------------------------------


def resolve_tracking_uri(config: TrackingConfig, storage_path: str) -> str:
    """The tracking URI every process of a run must use, absolute so that it survives a change of directory.

    ``MLFLOW_TRACKING_URI`` wins, then ``config.tracking_uri``, else an embedded sqlite store at
    ``<storage_path>/mlflow.db``. Resolve it once in the driver and hand the string to workers: Ray workers
    and Tune trials run in other directories, where MLflow's default ``sqlite:///mlflow.db`` would silently
    start a second, empty store.
    """
    explicit = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or config.tracking_uri.strip()
    if explicit:
        return _absolute_uri(explicit)
    if _is_remote(storage_path):
        raise ConfigError(
            f"storage_path {storage_path!r} is remote, so there is no local disk every node shares for an embedded "
            "MLflow store: run a tracking server (the cluster's head node runs one, see README 'Running on a "
            "cluster') and set MLFLOW_TRACKING_URI or tracking.tracking_uri to its http:// address"
        )
    folder = _local_path(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"  # an absolute path after sqlite:/// gives the four slashes


def _is_remote(path: str) -> bool:
    scheme = path.split("://", 1)[0].lower() if "://" in path else ""
    return bool(scheme) and scheme != "file"


def _local_path(path: str) -> Path:
    if path.startswith("file://"):
        path = path[len("file://") :]
    return Path(path).expanduser().resolve()


def _absolute_uri(uri: str) -> str:
    """Anchor a relative sqlite or file store at the current directory, now, before anything changes it."""
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :]
        if rest.startswith("/") or rest.startswith(":memory:") or not rest:
            return uri
        path, sep, query = rest.partition("?")
        return f"sqlite:///{Path(path).expanduser().resolve()}{sep}{query}"
    if uri.startswith("file:") and not uri.startswith("file:///"):
        return _local_path(uri[len("file:") :]).as_uri()
    if ":" not in uri and uri != "databricks":  # a bare path, which MLflow reads as a file store
        return _local_path(uri).as_uri()
    return uri


def experiment_url(server: str, experiment_id: str) -> str:
    """The experiment's runs in the MLflow UI served at ``server`` (``http://127.0.0.1:5000``): the model-training
    view (runs table and charts, not traces), with the columns that compare runs (owl2's shared view)."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def _view_columns(kind: str, keys: Iterable[str]) -> list[str]:
    """The UI's names of runs-table columns: ``metrics.`loss```, ``params.`seed```."""
    return [f"{kind}.`{key}`" for key in keys]


def _sqlite_artifact_root(tracking_uri: str) -> Path | None:
    """Artifacts beside the sqlite file: MLflow would otherwise put them in ``./mlruns`` of whichever
    directory the process creating the experiment happened to be in."""
    if not tracking_uri.startswith("sqlite:////"):
        return None
    database = Path(tracking_uri[len("sqlite:///") :].partition("?")[0])
    return database.parent / "mlartifacts"


# --------------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------------

_SECRET_WORDS = frozenset(
    {
        "token", "secret", "secrets", "password", "passwd", "pwd", "passphrase", "key", "apikey", "credential",
        "credentials", "auth", "authorization", "bearer", "cookie", "sig",
    }
)  # fmt: skip
# scheme://user:password@host -> scheme://***@host (a lone user name may be a token too, as in https://TOKEN@host).
_URI_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s]+@")
# Pre-signed URLs and the like carry credentials in the query string.
_SECRET_QUERY = re.compile(
    r"([?&](?:sig|[^=&#\s]*(?:token|secret|password|passwd|signature|credential|key|auth))[^=&#\s]*=)[^&#\s]+",
    re.IGNORECASE,
)
# HTTP credentials pasted into a value or a line: "Authorization: Bearer eyJ...", "Basic dXNlcjpwYXNz".
_AUTH_SCHEME = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9\-._~+/]{8,}=*", re.IGNORECASE)
_TEXT_ASSIGNMENT = re.compile(r"^(\s*(?:-\s+)?(?:export\s+)?[\"']?([\w.\-]+)[\"']?\s*[:=]\s*)(\S.*?)\s*$")


def is_secret_key(key: str) -> bool:
    """Whether a field called ``key`` holds a secret: one of its words (split at ``_ - .`` and camelCase) is
    token, secret, password, key, ... So ``hf_token`` and ``apiKey`` are secrets; ``tokenizer`` and
    ``max_new_tokens`` are not (the latter is numeric anyway, and numbers are never redacted)."""
    words = re.split(r"[_\-.\s/]+|(?<=[a-z0-9])(?=[A-Z])", key)
    return any(word.lower() in _SECRET_WORDS for word in words if word)


def redact_text(text: str) -> str:
    """Credentials in URIs removed from free text, and ``key: value`` / ``KEY=value`` lines whose key names a
    secret (YAML, env files) blanked."""
    text = _scrub(text)
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        match = _TEXT_ASSIGNMENT.match(body)
        if match and is_secret_key(match.group(2)) and not _is_literal(match.group(3)):
            line = match.group(1) + REDACTED + line[len(body) :]
        lines.append(line)
    return "".join(lines)


def _scrub(text: str) -> str:
    """Credentials inside free text: URI user info, secret query parameters, HTTP authorization values."""
    text = _URI_USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _SECRET_QUERY.sub(rf"\1{REDACTED}", text)
    return _AUTH_SCHEME.sub(rf"\1 {REDACTED}", text)


def _is_literal(value: str) -> bool:
    """Numbers, booleans and nulls are settings, not secrets (``max_keys: 10``)."""
    value = value.split(" #", 1)[0].strip().strip("\"'")
    if value.lower() in {"", "true", "false", "null", "none", "~", "[]", "{}"}:
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (nested dicts/lists) with secrets replaced by ``***``: string values of secret-named
    keys, and credentials inside any URI. Numbers, booleans and None are kept whatever the key."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [redact(v, key) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, str):
        if value and key and is_secret_key(key):
            return REDACTED
        return _scrub(value)
    if isinstance(value, bytes) and key and is_secret_key(key):
        return REDACTED
    return value


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "l": [{"c": 2}]}`` -> ``{"a.b": 1, "l.0.c": 2}``; lists of plain values stay whole."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        elif isinstance(value, (list, tuple)) and any(isinstance(item, Mapping) for item in value):
            flat.update(flatten({str(i): item for i, item in enumerate(value)}, name))
        else:
            flat[name] = value
    return flat


def _mlflow_key(key: str) -> str:
    """MLflow accepts only ``[/\\w.\\- ]`` in keys (colons are refused on Windows) and no path tricks."""
    key = re.sub(r"[^\w.\- /]", "_", key).strip("/")
    return re.sub(r"/{2,}", "/", key).replace("..", "_.") or "_"


# --------------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------------


class Tracker:
    """A thin layer over :class:`mlflow.MlflowClient` that addresses every run by its id.

    MLflow's fluent API keeps one global stack of active runs per process; with a parent run, stage runs
    and possibly several Tune trials in one process, that stack is how runs get mixed up. Here nothing is
    global: create the tracker from the URI of :func:`resolve_tracking_uri` (a plain string, cheap to send
    to workers) and pass run ids around.
    """

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient
        from mlflow.utils import validation

        self.tracking_uri = tracking_uri
        self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri)
        self._experiments: dict[str, str] = {}
        self._nonfinite: dict[str, Counter[str]] = {}
        self._param_length = getattr(validation, "MAX_PARAM_VAL_LENGTH", _FALLBACK_PARAM_LENGTH)
        self._tag_length = getattr(validation, "MAX_TAG_VAL_LENGTH", _FALLBACK_TAG_LENGTH)

    # ---- runs ------------------------------------------------------------------------------------

    def experiment_id(self, experiment: str) -> str:
        """The experiment's id, creating it on first use (safe when several processes race to create it), tagged
        as model training (:data:`EXPERIMENT_KIND_TAG`) unless it already names a kind, and with owl2's view of
        the runs table (:meth:`show_columns`)."""
        if experiment in self._experiments:
            return self._experiments[experiment]
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(experiment)
        view = {"selectedColumns": _view_columns("metrics", [WALL_TIME])}
        if found is None:
            root = _sqlite_artifact_root(self.tracking_uri)
            location = str(root / re.sub(r"[^\w.\-]", "_", experiment)) if root else None
            tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, SHARED_VIEW_PREFIX + VIEW_KEY: json.dumps(view)}
            try:
                experiment_id = self.client.create_experiment(experiment, artifact_location=location, tags=tags)
            except MlflowException:
                found = self.client.get_experiment_by_name(experiment)  # another trial created it first
                if found is None:
                    raise
                experiment_id = found.experiment_id
        elif found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {experiment!r} is deleted: restore it in the MLflow UI, delete it for good "
                "(`mlflow gc`), or set tracking.experiment to another name"
            )
        else:
            experiment_id = found.experiment_id
            if EXPERIMENT_KIND_TAG not in found.tags:  # a store from before owl2 tagged; a kind chosen in the UI stays
                self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
            if SHARED_VIEW_PREFIX + VIEW_KEY not in found.tags:
                self.client.set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + VIEW_KEY, json.dumps(view))
        self._experiments[experiment] = experiment_id
        return experiment_id

    def show_columns(self, experiment_id: str, metrics: Iterable[str] = (), params: Iterable[str] = ()) -> list[str]:
        """Add ``metrics`` and ``params`` to the columns of the runs table that :func:`experiment_url` opens, after
        those already there; returns the columns. A view that would outgrow MLflow's tag limit stays as it is.
        Two trials adding different columns at once may drop one's (read, then write): the next headline adds it
        again."""
        from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH

        key = SHARED_VIEW_PREFIX + VIEW_KEY
        stored = self.client.get_experiment(experiment_id).tags.get(key)
        try:
            view = json.loads(stored) if stored else {}
        except json.JSONDecodeError:  # edited by hand: start afresh
            view = {}
        columns = list(view.get("selectedColumns") or [])
        new = [c for c in _view_columns("metrics", metrics) + _view_columns("params", params) if c not in columns]
        if new:
            text = json.dumps({**view, "selectedColumns": columns + new})
            if len(text) > MAX_EXPERIMENT_TAG_VAL_LENGTH:
                logger.warning("experiment %s: the runs table's view is full; %s not shown", experiment_id, new)
                return columns
            self.client.set_experiment_tag(experiment_id, key, text)
            columns += new
        return columns

    def start_run(
        self,
        name: str,
        experiment: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> str:
        """A new run (a child of ``parent_run_id`` when given) and its id.

        ``resume=True`` continues the newest run of that name and parent instead, if there is one: it is
        marked RUNNING again and ``tags`` are updated, so re-running a stage does not duplicate it.
        """
        if resume:
            run_id = self.find_run(experiment, name, parent_run_id)
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
                if tags:
                    self.set_tags(run_id, tags)
                return run_id
        all_tags = {key: self._tag_value(value) for key, value in redact(dict(tags or {})).items()}
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=name, tags=all_tags)
        return run.info.run_id

    def find_run(self, experiment: str, name: str, parent_run_id: str | None = None) -> str | None:
        """The newest active run called ``name`` with that parent (None: a top-level run), if any."""
        from mlflow.entities import ViewType

        found = self.client.get_experiment_by_name(experiment)
        if found is None or found.lifecycle_stage == "deleted":
            return None
        if "'" not in name:
            query = f"attributes.run_name = '{name}'"
        elif '"' not in name:
            query = f'attributes.run_name = "{name}"'
        else:
            query = ""  # MLflow's filter grammar cannot quote both; compare in Python below
        runs = self.client.search_runs(
            [found.experiment_id],
            filter_string=query,
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time DESC"],
        )
        for run in runs:
            if run.info.run_name == name and run.data.tags.get(PARENT_RUN_TAG) == parent_run_id:
                return run.info.run_id
        return None

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        self.client.set_terminated(run_id, status=status)

    def fail_run(self, run_id: str) -> None:
        """End a run FAILED, unless it already ended. A sweep's driver ends a trial that its scheduler stopped,
        and the stage run inside, KILLED as soon as Tune lets go of the trial; the trial's own process, failing
        as Ray tears it down, may get here after that, and its FAILED must not replace the KILLED."""
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.end_run(run_id, "FAILED")

    def wait_ended(self, run_ids: Sequence[str], timeout_s: float = 30.0) -> None:
        """Wait until none of ``run_ids`` is RUNNING, or ``timeout_s`` has passed (a process that was killed
        never ends its runs)."""
        deadline = time.monotonic() + timeout_s
        pending = list(run_ids)
        while pending and time.monotonic() < deadline:
            pending = [run_id for run_id in pending if self.client.get_run(run_id).info.status == "RUNNING"]
            if pending:
                time.sleep(0.5)

    def child_runs(self, run_id: str, experiment_id: str | None = None) -> list[Any]:
        """The active runs whose parent is ``run_id`` (``mlflow.entities.Run``, latest metrics included), newest
        first. ``experiment_id``: the run's, when the caller knows it."""
        from mlflow.entities import ViewType

        experiment_id = experiment_id or self.client.get_run(run_id).info.experiment_id
        return self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_RUN_TAG}` = '{run_id}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time DESC"],
        )

    def end_stopped(self, run_id: str, status: str) -> None:
        """End a run that was stopped from outside (KILLED: a sweep's scheduler stopped it; FAILED: its trial
        crashed) together with its child runs, so that the stage runs inside end as the run does.

        Children still RUNNING take ``status``. With KILLED, children that ended FAILED are KILLED too: a stage
        stopped from outside may fail in its own process first (its Ray Train run loses the trial it reports to),
        yet it was stopped, not broken. FINISHED children stay FINISHED.
        """
        replaced = ("RUNNING", "FAILED") if status == "KILLED" else ("RUNNING",)
        for child in self.child_runs(run_id):
            if child.info.status in replaced:
                self.end_run(child.info.run_id, status)
        self.end_run(run_id, status)

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        experiment: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> Iterator[str]:
        """``with tracker.run(...) as run_id:`` ends the run FINISHED, KILLED on Ctrl-C, FAILED on an error
        (:meth:`fail_run`)."""
        run_id = self.start_run(name, experiment, parent_run_id, tags, resume=resume)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.end_run(run_id, "KILLED")
            raise
        except BaseException:
            self.fail_run(run_id)
            raise
        self.end_run(run_id, "FINISHED")

    # ---- logging ---------------------------------------------------------------------------------

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Log a nested dict as flat ``a.b.c`` params, secrets redacted, values cut to MLflow's length limit.

        MLflow refuses to change a logged param, which a resumed run with edited settings would try: values
        already logged unchanged are skipped, changed ones are not logged but returned (``{key: (logged,
        new)}``) and warned about; the new full config belongs in an artifact.
        """
        from mlflow.entities import Param

        values = {_mlflow_key(key): self._param_value(value) for key, value in flatten(redact(params)).items()}
        logged = self.client.get_run(run_id).data.params
        changed = {k: (logged[k], v) for k, v in values.items() if k in logged and logged[k] != v}
        if changed:
            logger.warning("run %s: params already logged with other values, kept as they were: %s", run_id, changed)
        todo = [Param(k, v) for k, v in values.items() if k not in logged]
        for start in range(0, len(todo), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=todo[start : start + _PARAMS_PER_BATCH])
        return changed

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> int:
        """Log numeric metrics at ``step`` in one request; NaN and infinities are skipped (MLflow stores them
        badly and plots break) but counted: :meth:`nonfinite_counts`, and the run's ``nonfinite_skipped``
        metric. Returns how many were skipped."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        counts = self._nonfinite.setdefault(run_id, Counter())
        batch, skipped = [], 0
        for key, value in metrics.items():
            number = float(value)
            if math.isfinite(number):
                batch.append(Metric(_mlflow_key(key), number, timestamp, int(step)))
            else:
                counts[key] += 1
                skipped += 1
        if skipped:
            batch.append(Metric("nonfinite_skipped", float(sum(counts.values())), timestamp, int(step)))
        for start in range(0, len(batch), _METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=batch[start : start + _METRICS_PER_BATCH])
        return skipped

    def add_wall_time(self, run_id: str, seconds: float) -> float:
        """Add ``seconds`` to the run's ``wall_time_s`` metric (a resumed run keeps counting); returns the total."""
        total = self.client.get_run(run_id).data.metrics.get(WALL_TIME, 0.0) + seconds
        self.log_metrics(run_id, {WALL_TIME: total}, step=0)
        return total

    def log_headline(self, run_id: str, stages: Sequence[str]) -> dict[str, float]:
        """Repeat on the parent run ``run_id`` each stage run's final loss, val_loss, wall time and eval scores
        as ``<stage>/<metric>`` (e.g. ``stage2/val_loss``), so that MLflow's runs table and charts compare
        experiments without expanding them, and shows them as columns of the runs table. ``stages``: the child
        runs' names; stages without a run are left out. Returns what was logged."""
        experiment_id = self.client.get_run(run_id).info.experiment_id
        runs = {}
        for child in reversed(self.child_runs(run_id, experiment_id)):  # oldest first: the newest of a name wins
            runs[child.info.run_name] = child
        values = {
            f"{stage}/{key}": value
            for stage in stages
            if stage in runs
            for key, value in runs[stage].data.metrics.items()
            if key in _HEADLINE or (key.startswith(_EVAL_PREFIX) and key != _EVAL_TIME)
        }
        if values:
            self.log_metrics(run_id, values, step=0)
            self.show_columns(experiment_id, values)
        return values

    def nonfinite_counts(self, run_id: str) -> dict[str, int]:
        """How often each metric was skipped as NaN/inf by this tracker."""
        return dict(self._nonfinite.get(run_id, {}))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        todo = [RunTag(_mlflow_key(k), self._tag_value(v)) for k, v in redact(dict(tags)).items()]
        for start in range(0, len(todo), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=todo[start : start + _PARAMS_PER_BATCH])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Save ``text`` as an artifact (credentials in URIs and ``secret_key: value`` lines redacted)."""
        self.client.log_text(run_id, redact_text(text), artifact_file)

    def log_dict(self, run_id: str, data: Mapping[str, Any], artifact_file: str) -> None:
        """Save a dict as YAML (``.yaml``/``.yml``) or JSON (``.json``), secrets redacted."""
        suffix = Path(artifact_file).suffix.lower()
        clean = redact(data)
        if suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(json.loads(json.dumps(clean, default=str)), sort_keys=False)
        elif suffix == ".json":
            text = json.dumps(clean, indent=2, default=str)
        else:
            raise ValueError(f"artifact_file {artifact_file!r} must end in .json, .yaml or .yml")
        self.client.log_text(run_id, text, artifact_file)

    def _param_value(self, value: Any) -> str:
        return _cut(str(value), self._param_length)

    def _tag_value(self, value: Any) -> str:
        return _cut(str(value), self._tag_length)


def _cut(text: str, limit: int) -> str:
    marker = "...[truncated]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


class SystemMetrics:
    """MLflow's own sampler of CPU, memory, disk, network and GPU use for one run (``system/...`` metrics, the
    run page's "System metrics" tab), on a thread of its own between :meth:`start` and :meth:`finish`.

    GPU figures come only where MLflow finds ``pynvml`` (the ``nvidia-ml-py`` package) or ROCm's equivalent.
    A resumed run continues its earlier samples' steps. Failures are warned about, never raised: tracking must not
    stop a run. Both calls may wait on the tracking server; the training loop makes them on its sender's thread.
    """

    def __init__(self, tracking_uri: str, run_id: str, interval_s: float) -> None:
        self.tracking_uri, self.run_id, self.interval_s = tracking_uri, run_id, interval_s
        self._monitor: Any = None

    def start(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=self.interval_s, resume_logging=True, tracking_uri=self.tracking_uri
            )
            monitor.start()
        except Exception as error:  # psutil missing, store unreachable: the run goes on without system metrics
            logger.warning("run %s: no system metrics (%s: %s)", self.run_id, type(error).__name__, error)
            return
        self._monitor = monitor

    def finish(self) -> None:
        """Stop sampling and send what was sampled; the sampler's thread is gone when this returns."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


# --------------------------------------------------------------------------------------------------
# Tags and fingerprints
# --------------------------------------------------------------------------------------------------


def run_tags(stage: str | None, config_yaml: str, data_fingerprint: str | None) -> dict[str, str]:
    """What a run needs to be reproduced: code version, config hash, data fingerprint and stage.

    ``mlflow.source.git.commit`` is set too, so the MLflow UI shows the commit in its own column.
    """
    commit, dirty = _git_state()
    tags = {
        "owl2.version": owl2.__version__,
        "owl2.git_commit": commit,
        "owl2.git_dirty": dirty,
        "owl2.config_hash": hashlib.sha256(config_yaml.encode()).hexdigest()[:16],
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if stage is not None:
        tags["owl2.stage"] = stage
    if data_fingerprint is not None:
        tags["owl2.data_fingerprint"] = data_fingerprint
    return tags


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str, str]:
    """(commit, "true"/"false") of the repository holding the owl2 package, ("unknown", "unknown") when the
    package is not in a git checkout (installed wheel, no git binary). Never raises: tracking must not stop
    a run. Dirty means tracked files differ from the commit; untracked files (data, outputs) do not count."""
    package_root = Path(owl2.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(package_root), *args], capture_output=True, text=True, timeout=10, check=True
        )
        return result.stdout.strip()

    try:
        # A wheel inside some other repository (a venv in a project) must not report that project's commit.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != package_root:
            return "unknown", "unknown"
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, "true" if dirty else "false"


def data_fingerprint(sources: list[SourceConfig]) -> str:
    """A short hash that changes when the data a stage reads probably changed, without reading any file.

    Per source: format, paths, image_root and weight; for local files their sizes and modification times,
    for local folders the sorted relative names and sizes of the files in them; for URIs only the strings
    (listing a bucket would be slow and needs credentials). Images under ``image_root`` are not listed
    (hundreds of thousands of files): a changed image folder needs a new path to show here.
    """
    digest = hashlib.sha256()
    for source in sources:
        paths = [source.path] if isinstance(source.path, str) else list(source.path)
        entry = {
            "format": source.format,
            "paths": paths,
            "image_root": source.image_root,
            "weight": source.weight,
            "files": [_path_state(path) for path in paths],
        }
        digest.update(json.dumps(entry, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _path_state(path: str) -> Any:
    if _is_remote(path):
        return None
    local = _local_path(path)
    if local.is_file():
        stat = local.stat()
        return [stat.st_size, stat.st_mtime_ns]
    if local.is_dir():
        files = []
        for folder, _, names in os.walk(local):
            for name in names:
                file = Path(folder, name)
                with contextlib.suppress(OSError):  # a file removed while we list
                    files.append([file.relative_to(local).as_posix(), file.stat().st_size])
        return sorted(files)
    return "missing"
