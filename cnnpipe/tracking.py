"""The only module that talks to MLflow.

One pipeline run is one MLflow run: `train` starts it (or adopts the run `mlflow run` made, via
MLFLOW_RUN_ID), writes its id next to the model, and `evaluate` / `register` log into the same run.
Artifacts of each stage go under a folder named after the stage.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnpipe.config import DEFAULT_PARAMS, TrackingConfig, load_block, sqlite_path
from cnnpipe.engine.model_folder import MODEL_FILE, RUN_FILE
from cnnpipe.errors import CnnpipeError, ServiceUnavailable
from cnnpipe.fsio import file_digest, read_json, write_json


# The metrics a reader looks at first: the columns of the MLflow experiment's "cnnpipe" view and of
# `dvc metrics show` (evaluate writes them to the evaluation folder's headline file); the rest stay one click away
HEADLINE_METRICS = ("test/accuracy", "test/f1_macro", "test/ece", "test/accuracy_tta", "test_roi/accuracy",
                    "val/accuracy", "calibration/temperature")
VIEW_KEY = "cnnpipe"  # the experiment's saved runs view with the headline columns (Tracker.view_page)
# MLflow 3 opens an experiment of unknown kind in its GenAI traces view; this kind opens the model-training view
# (MLflow 3.17's UI decides by its GenAI / Model training switch instead: Tracker.view_page sets it in the link)
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    # a saved view of the runs table (the UI's "share view"): its default columns plus the headline metrics
    f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps({
        "selectedColumns": ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`",
                            *(f"metrics.`{key}`" for key in HEADLINE_METRICS)],
        "orderByKey": "attributes.start_time", "orderByAsc": False}),
}
MODEL_DIGEST_TAG = "cnnpipe.model_sha256"  # of the model file a run trained: finds the run of a restored model folder


def _quiet_logs() -> None:
    """No INFO lines about a new SQLite store's tables on a user's terminal."""
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def kept_mlflow_uris() -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs, and the environment variables it exports them to, put
    back as they were when the block ends."""
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        yield
    finally:
        if "mlflow" in sys.modules:  # where MLflow was never imported it holds nothing to put back
            import mlflow

            mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])  # None: unset, as before
            mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_model, register_model) works on the process-wide URIs: pointed at `uri`
    for the call only, so that a caller's own settings (a notebook's), and the store this process tracks to next,
    are left as they were."""
    import mlflow

    with kept_mlflow_uris():
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """MLflow's chatter kept off a user's terminal while our pyfunc model is defined or logged: its warning that
    predict has no type hints (it takes images in any form: no hint fits), and the INFO line of its input example
    check. MLflow sets its own warning filters around the type check, so that warning is dropped where it is shown."""
    _quiet_logs()
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202 - showwarning's
            if "Add type hints to the `predict` method" not in str(message):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        pyfunc_log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            pyfunc_log.setLevel(level)


def tracking_config(params: dict[str, Any], args: argparse.Namespace, params_path: Path) -> TrackingConfig:
    """The tracking block of a command: its --tracking-uri / --tracking-experiment flags win."""
    return tracking_settings(params, getattr(args, "tracking_uri", None), getattr(args, "tracking_experiment", None),
                             params_path)


def tracking_settings(params: dict[str, Any], uri: str | None = None, experiment: str | None = None,
                      params_path: Path = DEFAULT_PARAMS) -> TrackingConfig:
    """The tracking block; precedence: `uri` / `experiment` given, then MLFLOW_TRACKING_URI, then params."""
    overrides = {"uri": uri or os.environ.get("MLFLOW_TRACKING_URI") or None, "experiment": experiment}
    block = params if "tracking" in params else {**params, "tracking": {}}
    return load_block(TrackingConfig, "tracking", block, overrides, params_path)


def _check_reachable(uri: str) -> None:
    """Fail fast with one line; MLflow's own client would retry an unreachable server for minutes."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServiceUnavailable(f"tracking URI {uri} cannot be reached: {reason}") from None
    elif (db := sqlite_path(uri)) is not None:
        if not db.parent.is_dir():
            raise ServiceUnavailable(f"tracking URI {uri}: directory '{db.parent}' does not exist")
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise ServiceUnavailable(f"tracking URI {uri}: '{db}' is not writable")


def _artifact_root(uri: str) -> str | None:
    """With a SQLite store, artifacts live in `mlartifacts/` beside the database (as `mlflow server` does)."""
    db = sqlite_path(uri)
    return (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None  # else the server decides


@dataclass(eq=False)
class Tracker:
    """A handle on one MLflow run."""

    uri: str
    run_id: str

    @functools.cached_property
    def client(self):  # noqa: ANN201 - MlflowClient, imported lazily
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    @staticmethod
    def source_tags(manifest: dict[str, Any], data_dir: Path | None = None) -> dict[str, str]:
        """Where a run's code and data came from: the git commit, the dataset's input hashes, the DVC
        repository and commit it was read from, and, under DVC, the processed dataset's version (its md5 in dvc.lock)."""
        inputs = json.dumps(manifest["source"].get("inputs", []), sort_keys=True).encode()
        tags = {"dataset.source": manifest["source"]["name"],
                "dataset.inputs_sha256": hashlib.sha256(inputs).hexdigest()}
        origin = manifest["source"].get("dvc")
        if origin:  # read from a DVC repository at a commit: the exact, named data version
            tags |= {"dataset.dvc_repo": origin["repo"], "dataset.dvc_rev": origin["rev"] or "",
                     "dataset.dvc_commit": origin["commit"]}
        version = _dvc_version(data_dir) if data_dir is not None else None
        if version:
            tags["dataset.dvc_md5"] = version
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            if commit.returncode == 0:
                tags["git.commit"] = commit.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass  # not a git checkout, or no git: the tag is simply absent
        return tags

    @classmethod
    def start(cls, cfg: TrackingConfig, run_name: str, tags: dict[str, str]) -> Tracker:
        """Start the pipeline's run, or adopt the one `mlflow run` started for us; runs left RUNNING by a
        dead process of this machine are marked KILLED first."""
        client = _connect(cfg.uri)
        reap(cfg.uri)
        with _store_lock(cfg.uri):  # two first runs on one store: one creates the experiment
            exp = client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment, _artifact_root(cfg.uri),
                                                                            EXPERIMENT_TAGS)
            for key, value in EXPERIMENT_TAGS.items():  # an experiment made before cnnpipe set them
                if exp and exp.tags.get(key) != value:
                    client.set_experiment_tag(exp_id, key, value)
        tags = {**tags, **owner_tags()}
        adopted = os.environ.get("MLFLOW_RUN_ID")
        if adopted:
            project_run = client.get_run(adopted)
            # `mlflow run` without --experiment-name puts its run in the Default experiment (id 0): the
            # pipeline's run then goes where tracking.experiment says, linked both ways; a run in any other
            # experiment was placed there on purpose, and is adopted
            if project_run.info.experiment_id != "0" or exp_id == "0":
                tracker = cls(cfg.uri, adopted)
                tracker.set_tags(tags)
                return tracker
            tags = {**tags, "cnnpipe.mlflow_project_run": adopted}
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        if adopted:
            cls(cfg.uri, adopted).set_tags({"cnnpipe.pipeline_run": run.info.run_id,
                                            "mlflow.note.content": f"The pipeline logged into run {run.info.run_id} of "
                                                                   f"experiment {cfg.experiment!r} (tracking.experiment)."})
        return cls(cfg.uri, run.info.run_id)

    @classmethod
    def reopen(cls, cfg: TrackingConfig, run_id: str, where: str, running: bool = False) -> Tracker:
        """An existing run, whose id was read from `where`: a resumed training (`running`: it is RUNNING
        again), evaluate and register log into it."""
        client = _connect(cfg.uri)
        try:
            client.get_run(run_id)
        except Exception:
            raise CnnpipeError(f"MLflow run {run_id} from '{where}' is not in the tracking store {cfg.uri} "
                               f"(was it written against another store?)") from None
        reap(cfg.uri)
        tracker = cls(cfg.uri, run_id)
        tracker.set_tags(owner_tags())  # this process now writes into it (register sets it RUNNING meanwhile)
        if running:
            client.update_run(run_id, "RUNNING")
        return tracker

    @classmethod
    def resume(cls, cfg: TrackingConfig, run_dir: Path) -> Tracker:
        """The run whose id `train` wrote into `run_dir`. A model folder DVC restored (`dvc checkout`, a fresh
        clone's `dvc pull`) has no run file (it is in .dvcignore: a run id is no part of what train makes):
        then the run that trained this very model file, found by its digest, or a new run when this store
        has none."""
        if (run_dir / RUN_FILE).exists():
            info = read_json(run_dir / RUN_FILE, "MLflow run file")
            return cls.reopen(cfg, str(info.get("run_id")), str(run_dir / RUN_FILE))
        if not (run_dir / MODEL_FILE).is_file():
            raise CnnpipeError(f"model folder '{run_dir}': neither {RUN_FILE} nor {MODEL_FILE} found (run `cnnpipe train`)")
        digest = file_digest(run_dir / MODEL_FILE)
        client = _connect(cfg.uri)
        exp = client.get_experiment_by_name(cfg.experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.`{MODEL_DIGEST_TAG}` = '{digest}'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if exp else []
        if runs:
            return cls.reopen(cfg, runs[0].info.run_id, f"{run_dir} (the run that trained {MODEL_FILE})")
        print(f"model folder '{run_dir}' has no {RUN_FILE} and no run of {cfg.uri} trained its {MODEL_FILE}: "
              f"logging into a new run", file=sys.stderr)
        return cls.start(cfg, run_dir.name, {MODEL_DIGEST_TAG: digest, "mlflow.note.content":
                                             f"The model folder {run_dir} was restored by DVC; the run that trained "
                                             f"it is not in this tracking store."})

    def view_page(self) -> str:
        """Where the MLflow UI shows this run's experiment in the model-training view, headline metrics as
        columns: the page's address under the tracking server (or `mlflow ui`) after its host."""
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return f"/#/experiments/{experiment}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"

    def write_run_file(self, run_dir: Path) -> None:
        """Name this run in `run_dir` (a model folder, its model file written): later stages log into it."""
        write_json(run_dir / RUN_FILE, {"run_id": self.run_id, "tracking_uri": self.uri})
        self.set_tags({MODEL_DIGEST_TAG: file_digest(run_dir / MODEL_FILE)})

    def log_params(self, params: dict[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(f"{prefix}{k}", str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v == v]  # NaN: not logged
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, folder: str) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def set_status(self, status: str) -> None:
        """End the run as FINISHED, FAILED or KILLED (a pruned trial)."""
        self.client.set_terminated(self.run_id, status)

    def child_runs(self) -> list[Any]:
        """The runs whose parent is this run (sweep points, tune trials)."""
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return self.client.search_runs([experiment], f"tags.mlflow.parentRunId = '{self.run_id}'",
                                       max_results=50000)

    def log_pyfunc_model(self, name: str, input_example: Any, output_example: Any, params: dict[str, Any],
                         **kwargs: Any) -> str:
        """Log an MLflow pyfunc model into this run, its signature inferred from a real input and output;
        returns its model URI."""
        import mlflow
        from mlflow.models import ModelSignature, infer_signature
        from mlflow.types.schema import AnyType, ColSpec, Schema

        # log_model works on the fluent API's active run; scope it to this run and store
        with fluent_store(self.uri), mlflow.start_run(run_id=self.run_id), quiet_mlflow(), warnings.catch_warnings():
            # MLflow warns that integer columns cannot hold missing values: ours never miss
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")
            inferred = infer_signature(input_example, output_example, params=params)
            # the `image` column holds base64 text or uint8 arrays: a type MLflow checks as "any"
            signature = ModelSignature(Schema([ColSpec(AnyType(), c) for c in input_example.columns]),
                                       inferred.outputs, inferred.params)
            info = mlflow.pyfunc.log_model(name=name, signature=signature, input_example=input_example, **kwargs)
        return info.model_uri

    def register_model(self, model_uri: str, name: str, tags: dict[str, str]) -> str:
        """Register `model_uri` as a new version of `name`; returns the version."""
        import mlflow

        with fluent_store(self.uri):  # a logged model's URI is resolved through the tracking store
            version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
        return str(version.version)


def _dvc_version(data_dir: Path) -> str | None:
    """The md5 dvc.lock records for `data_dir` (a stage output), when running in a DVC workspace."""
    import yaml

    lock = Path("dvc.lock")
    if not lock.exists():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    want = os.path.normpath(str(data_dir))
    for stage in stages.values():
        for out in stage.get("outs", []):
            if os.path.normpath(out.get("path", "")) == want:
                return out.get("md5")
    return None


@contextlib.contextmanager
def _store_lock(uri: str, purpose: str = "init", holder: str = "") -> Iterator[None]:
    """A lock file beside a SQLite store (`<db>.cnnpipe-<purpose>.lock`), for what two processes must not do at
    once (create its tables or an experiment; update the registry); nothing for a tracking server, which
    serializes the former itself. `holder` names who held it too long in the error."""
    from filelock import FileLock, Timeout

    db = sqlite_path(uri)
    if db is None:
        yield
        return
    lock = FileLock(f"{db}.cnnpipe-{purpose}.lock")
    try:
        lock.acquire(timeout=LOCK_TIMEOUT)
    except Timeout:
        raise ServiceUnavailable(f"tracking URI {uri}: {holder or 'another process'} has held '{lock.lock_file}' "
                                 f"for {LOCK_TIMEOUT} s") from None
    try:
        yield
    finally:
        lock.release()


def _connect(uri: str):  # noqa: ANN202 - MlflowClient, imported lazily
    _check_reachable(uri)
    _quiet_logs()
    from mlflow import MlflowClient

    try:
        with _store_lock(uri):  # the first use of a new SQLite store creates its tables: one process at a time
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
    except ServiceUnavailable:
        raise
    except Exception as e:
        raise ServiceUnavailable(f"tracking URI {uri} cannot be used: {str(e).splitlines()[0]}") from None
    return client


# Who writes into a run or registers a version: enough to judge later whether that process still lives.
PID_TAG, HOST_TAG, STARTED_TAG = "cnnpipe.pid", "cnnpipe.host", "cnnpipe.pid_started"
STATE_TAG = "cnnpipe.state"  # of a version: "registering" until `register` has finished with it


def owner_tags() -> dict[str, str]:
    import psutil

    me = psutil.Process()
    return {PID_TAG: str(me.pid), HOST_TAG: socket.gethostname(), STARTED_TAG: f"{me.create_time():.2f}"}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process the tags name still runs (None: another machine's, or no tags to judge by)."""
    import psutil

    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return None
    try:
        owner = psutil.Process(int(tags[PID_TAG]))
        # a killed process stays a zombie until its new parent reaps it (seconds, or never under some PID 1s)
        return f"{owner.create_time():.2f}" == tags.get(STARTED_TAG) and owner.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap(uri: str) -> dict[str, list[str]]:
    """Mark KILLED every RUNNING run whose process died on this machine, and delete every model version whose
    `register` died before finishing with it. Returns the run ids / versions by what was done or seen."""
    from mlflow.entities import ViewType

    client = _connect(uri)
    found: dict[str, list[str]] = {"killed_runs": [], "live_runs": [], "unjudged_runs": [], "deleted_versions": []}
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    for run in client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=10000) if experiments else []:
        alive = owner_alive(run.data.tags)
        if alive is False:
            client.set_tag(run.info.run_id, "cnnpipe.reaped", f"process {run.data.tags[PID_TAG]} died")
            client.set_terminated(run.info.run_id, "KILLED")
        found[{False: "killed_runs", True: "live_runs", None: "unjudged_runs"}[alive]].append(run.info.run_id)
    for version in client.search_model_versions(f"tags.`{STATE_TAG}` = 'registering'"):
        if owner_alive(version.tags) is False:
            client.delete_model_version(version.name, version.version)
            found["deleted_versions"].append(f"{version.name}/{version.version}")
    return found


class NotRegistered(CnnpipeError):
    """The registry has no such model, version or alias."""


CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "cnnpipe.champion_history"  # JSON list of the versions that held `champion`, oldest first
LOCK_TIMEOUT = 600  # seconds a promote waits for another one (each scores two models on the test split)


@dataclass(eq=False)
class Registry:
    """The MLflow Model Registry: versions, aliases, tags, and loading a registered model."""

    uri: str

    @functools.cached_property
    def client(self):  # noqa: ANN201 - MlflowClient, imported lazily
        return _connect(self.uri)

    def version(self, name: str, ref: str) -> Any:
        """A model version by number or by alias; a clear error when either does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(name, ref) if ref.isdigit() \
                else self.client.get_model_version_by_alias(name, ref)
        except MlflowException:
            raise NotRegistered(f"model {name!r} has no version {'or alias ' if not ref.isdigit() else ''}{ref!r} "
                               f"in the registry at {self.uri}") from None

    def run_version(self, name: str, run_id: str) -> str | None:
        """The version of `name` registered from run `run_id`, if any."""
        found = [v for v in self.client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
        return str(min(int(v.version) for v in found)) if found else None

    def alias_version(self, name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def tag_version(self, name: str, version: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(name, version, k, str(v))

    def champion_history(self, name: str) -> list[str]:
        return json.loads(self.client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))

    def update_lock(self) -> contextlib.AbstractContextManager[None]:
        """Serialize read-decide-write updates of the registry (promote, rollback) across processes. A SQLite
        store gets a lock file beside it; a tracking server offers no lock: `set_champion` then checks that
        nothing changed since the history was read, and the loser of a race fails with one line."""
        return _store_lock(self.uri, "registry", "another promote/rollback")

    def set_champion(self, name: str, version: str, history: list[str], read: list[str]) -> None:
        """Give `champion` to `version` and record `history`, unless the history is no longer `read`."""
        if self.champion_history(name) != read:
            raise CnnpipeError(f"model {name!r}: its champion history changed while this command ran (a concurrent "
                               f"promote or rollback won): nothing changed here; run it again")
        self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        self.set_alias(name, CHAMPION, version)

    def resolve(self, model_uri: str) -> Any | None:
        """The registered version whose files `model_uri` addresses, in any of its forms: models:/<name>/<version>,
        models:/<name>@<alias>, models:/<name>/latest (or a stage), the logged model models:/m-<id> and
        runs:/<run>/<path> (the version registered from it); None when no version holds them (a local folder, an
        unregistered run's model, any other URI)."""
        from mlflow.exceptions import MlflowException

        if (logged := re.fullmatch(r"models:/(m-[0-9a-f]+)", model_uri)) is not None:
            return self._logged_version(logged[1])
        if (ref := re.fullmatch(r"models:/([^/@]+)(?:/([^/@]+)|@([^/@]+))", model_uri)) is not None:
            name, ref_, alias = ref[1], ref[2], ref[3]
            if alias is not None or ref_.isdigit():
                return self.version(name, alias or ref_)
            return self._newest(name, None if ref_.lower() == "latest" else ref_)
        if model_uri.startswith("models:/"):
            raise CnnpipeError(f"model URI {model_uri!r}: expected models:/<name>/<version>, models:/<name>@<alias>, "
                               f"models:/<name>/latest or models:/m-<id>")
        if (run := re.fullmatch(r"runs:/([^/]+)/(.+)", model_uri)) is not None:
            path = run[2].strip("/")
            for version in sorted(self.client.search_model_versions(f"run_id = '{run[1]}'"), key=lambda v: int(v.version)):
                source = str(version.source or "")
                try:
                    if source.startswith("models:/m-") and \
                            self.client.get_logged_model(source.removeprefix("models:/")).name == path:
                        return version
                except MlflowException:
                    continue  # a logged model deleted since: not this one
                if source.rstrip("/").endswith(f"/{path}"):  # registered from the run's artifact folder (MLflow 2)
                    return version
        return None

    def _logged_version(self, model_id: str) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            run_id = self.client.get_logged_model(model_id).source_run_id
        except MlflowException:
            raise NotRegistered(f"logged model {model_id!r} is not in the tracking store {self.uri}") from None
        found = [v for v in self.client.search_model_versions(f"run_id = '{run_id}'") if v.source == f"models:/{model_id}"]
        return min(found, key=lambda v: int(v.version)) if found else None

    def _newest(self, name: str, stage: str | None) -> Any:
        """The highest version of `name` (in `stage`, compared as MLflow does: case-insensitively)."""
        found = [v for v in self.client.search_model_versions(f"name = '{name}'")
                 if stage is None or str(v.current_stage).lower() == stage.lower()]
        if not found:
            raise NotRegistered(f"model {name!r} has no version{f' in stage {stage!r}' if stage else ''} in the "
                                f"registry at {self.uri}")
        return max(found, key=lambda v: int(v.version))

    def model_files(self, model_uri: str, dst: Path) -> tuple[Path, Any | None, str]:
        """A model's folder (a local one as it is, else downloaded into `dst`), the registered version holding it
        (None: no version does, see `resolve`), and its name for messages."""
        if Path(model_uri).is_dir():  # before importing MLflow: a served folder starts sooner without it
            return Path(model_uri), None, f"model folder '{model_uri}'"
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        version, uri, where = None, model_uri, model_uri
        try:
            version = self.resolve(model_uri)
            if version is not None:  # its files, wherever they are (MLflow resolves models:/m-... in its default store)
                where = f"models:/{version.name}/{version.version}"
                uri = self.client.get_model_version_download_uri(version.name, version.version)
            elif model_uri.startswith("models:/m-"):
                uri = self.client.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
            quiet = {} if sys.stderr.isatty() else {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # a bar only on a TTY
            with _environ(quiet):
                path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=self.uri,
                                                           registry_uri=self.uri)
            return Path(path), version, where
        except (MlflowException, OSError) as e:
            raise CnnpipeError(f"model {model_uri!r} cannot be read from {self.uri}: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the block only (MLflow reads some settings nowhere else)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

