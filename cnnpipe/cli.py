"""`cnnpipe <stage>`: translate flags and params.yaml into one stage call; nothing more.

Each command prints its small result as JSON on stdout and progress on stderr. Exit codes:
0 ok, 1 internal error (a bug: traceback shown), 2 bad input, 3 tracking store unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from cnnpipe import __version__
from cnnpipe.config import (
    EvaluateConfig,
    RegisterConfig,
    ServeConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    add_flags,
    apply_overrides,
    load_block,
    parse_assignments,
    read_params,
    sqlite_path,
)
from cnnpipe.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, CnnpipeError
from cnnpipe.remote import location_arg
from cnnpipe.search.space import load_tune
from cnnpipe.stages.spec import STAGES, run_stage
from cnnpipe.tracking import tracking_config

Handler = Callable[[argparse.Namespace, dict, Path], dict]
MODEL_HELP = "model URI, MLflow model folder or train folder (default: models:/<register.model_name>@champion)"
UNVERIFIED_HELP = ("load a model no registered version vouches for (a version missing its sha256 tags, an "
                   "unregistered run's model), with a warning; files that differ from their tags are refused anyway")
CALIBRATION_HELP = ("the calibration.json of `cnnpipe evaluate` to apply instead of the model's own: a registered model "
                    "carries its own; a bare train folder (--model data/model) has none and serves uncalibrated (T = 1) "
                    "without this")

# The optional dependency (pyproject's extras) that brings each module a command may import
EXTRA_OF_MODULE = {"sklearn": "train", "matplotlib": "train", "uvicorn": "serve", "starlette": "serve",
                   "mlflow": "mlflow", "pandas": "mlflow", "dvc": "dvc", "kfp": "kfp", "docker": "kfp",
                   "boto3": "sagemaker", "botocore": "sagemaker", "optuna": "tune", "ruamel": "tune",
                   "kubeflow": "katib", "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "serve-onnx",
                   "torch": "torch", "torchvision": "torch",
                   "timm": "timm", "safetensors": "timm", "pytorch_grad_cam": "explain",
                   "webdataset": "stream"}


def _cfg(cls: type, block: str, args: argparse.Namespace, params: dict, params_path: Path):  # noqa: ANN202
    return load_block(cls, block, params, vars(args), params_path)


def _stage(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    """Any pipeline stage, as cnnpipe.stages.spec declares it: flags win over its block."""
    stage = STAGES[args.command]
    return run_stage(stage.name, params, flags=vars(args), tracking_uri=getattr(args, "tracking_uri", None),
                     tracking_experiment=getattr(args, "tracking_experiment", None),
                     no_tracking=getattr(args, "no_tracking", False), params_path=pp,
                     **{p.name: getattr(args, p.name) for p in (*stage.ports, *stage.options)})


def _promote(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe import promotion as promote

    cfg = _cfg(RegisterConfig, "register", args, params, pp)
    return promote.promote(cfg, tracking_config(params, args, pp), cfg.model_name, args.version, args.data, args.force)


def _rollback(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe import promotion as promote

    return promote.rollback(tracking_config(params, args, pp), _cfg(RegisterConfig, "register", args, params, pp).model_name)


def _gc(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe import housekeeping

    return housekeeping.run(tracking=tracking_config(params, args, pp), checkpoint=args.checkpoint)


def _model_uri(args: argparse.Namespace, params: dict, pp: Path) -> str:
    return args.model or f"models:/{_cfg(RegisterConfig, 'register', args, params, pp).model_name}@champion"


def _serve(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    import tempfile

    from cnnpipe.serving.contract import Budgets
    from cnnpipe.serving.local import load_model_file
    from cnnpipe.serving.server import INFERENCE_THREADS, ModelInvoke, ServingApp, listen, serve

    cfg = load_block(ServeConfig, "serve", params if "serve" in params else {**params, "serve": {}}, vars(args), pp)
    uri = _model_uri(args, params, pp)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-serve-") as folder:
        predictor, top_k, model_file = load_model_file(tracking_config(params, args, pp), uri, cfg.backend, Path(folder),
                                                       args.calibration, cfg.tta,
                                                       allow_unverified=args.allow_unverified)
        if cfg.tta and not predictor.tta:
            print(f"serve: TTA off: {uri} carries no flip that keeps or swaps a class", file=sys.stderr)
        sock = listen(args.host, args.port)
        app = ServingApp(ModelInvoke(str(model_file), cfg.backend, top_k, Budgets.of(cfg), INFERENCE_THREADS,
                                     predictor.calibration, predictor.tta), cfg)
        if cfg.workers == 1:
            app.preload()  # a bad model fails here with one line, before the server starts
        serve(app, sock, cfg, uri)
    return {"served": uri, "backend": cfg.backend, "workers": cfg.workers,
            "temperature": predictor.calibration.temperature, "tta": predictor.tta, "stopped": True}


def _predict(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    import tempfile

    from cnnpipe.serving.local import load_model_file, predict_files

    with tempfile.TemporaryDirectory(prefix="cnnpipe-predict-") as folder:
        predictor, _, _ = load_model_file(tracking_config(params, args, pp), _model_uri(args, params, pp), args.backend,
                                          Path(folder), args.calibration,
                                          allow_unverified=args.allow_unverified)
        return {**predict_files(predictor, args.paths, args.output, args.batch_size), "backend": args.backend}


def _explain(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.engine.model_folder import MODEL_FILE
    from cnnpipe.engine.predictor import Predictor
    from cnnpipe.evaluation.explain import default_output, explain_image

    uri = _model_uri(args, params, pp)
    if uri.startswith(("models:/", "runs:/")):
        from cnnpipe.serving.local import load_registered

        predictor, _ = load_registered(tracking_config(params, args, pp), uri, allow_unverified=args.allow_unverified)
    else:
        path = Path(uri)
        predictor = Predictor.from_file(path / MODEL_FILE if path.is_dir() else path)
    return explain_image(predictor, args.image, args.output or default_output(args.image), args.class_name)


def _init(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe import init_params

    return init_params.run(path=args.path, params_file=pp, force=args.force, overrides=parse_assignments(args.set))


def _sweep(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.search import sweep

    if bool(args.grid) == bool(args.preset):
        raise CnnpipeError("sweep: give --grid axes or --preset study (one of the two)")
    points = sweep.STUDY if args.preset == "study" else sweep.grid(args.grid)
    name = args.name or ("study" if args.preset else "sweep")
    evaluate_cfg = load_block(EvaluateConfig, "evaluate", params, {}, pp)
    return sweep.run(_cfg(TrainConfig, "train", args, params, pp), evaluate_cfg, tracking_config(params, args, pp),
                     args.data, args.augmented, args.out or Path(f"data/sweeps/{name}"), points, name)


def _tune(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.search import tune

    cfg, space = load_tune(params, vars(args), pp)
    tracking = tracking_config(params, args, pp)
    if args.apply:
        return tune.apply(cfg, tracking, pp)
    return tune.run(cfg, space, params, tracking, args.data, args.augmented, args.out or Path(f"data/tune/{cfg.study}"))


def _pipeline(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.pipeline import training

    if args.action == "compile" and args.tune:
        from cnnpipe.pipeline import katib

        cfg, space = load_tune(params, {}, pp)
        return {"compiled": str(katib.write_experiment(args.output or Path("katib-experiment.yaml"), cfg, space,
                                                       params, args.tracking_uri or katib.CLUSTER_TRACKING_URI))}
    arguments, topology = training.arguments(params, args.param)
    if args.action == "compile":
        return {"compiled": str(training.compile_pipeline(args.output or Path("pipeline.yaml"), arguments, topology)),
                "nodes": topology.nodes}
    if args.action == "submit":
        if not args.host:
            raise CnnpipeError("pipeline submit: --host (the Kubeflow Pipelines API URL) is required")
        return training.submit(args.host, arguments, args.experiment, args.run_name, not args.no_cache, topology)
    if topology.nodes > 1:
        raise CnnpipeError(f"pipeline run-local: -p nodes={topology.nodes} needs a Kubernetes cluster with Kubeflow's "
                           "Training Operator (use `pipeline submit`); run-local trains on this machine, one node")
    uri = tracking_config(params, args, pp).uri
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():  # components run elsewhere: an absolute path
        uri = f"sqlite:///{db.resolve()}"
    return training.run_local({**arguments, "tracking_uri": arguments.get("tracking_uri", uri)}, args.root.resolve(),
                              not args.no_cache, args.runner)


def _export(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    import shutil
    import tempfile

    from cnnpipe.fsio import atomic_file
    from cnnpipe.serving.local import load_model_file, load_registered

    tracking, uri = tracking_config(params, args, pp), _model_uri(args, params, pp)
    if args.target == "onnx" or args.backend == "onnxruntime":  # the registered graph, or one exported now
        with tempfile.TemporaryDirectory(prefix="cnnpipe-export-") as folder:
            predictor, _, graph = load_model_file(tracking, uri, "onnxruntime", Path(folder), args.calibration, args.tta,
                                                  allow_unverified=args.allow_unverified)
            if args.target == "sagemaker":
                from cnnpipe.serving.sagemaker import export_onnx_archive

                return export_onnx_archive(graph, args.tta, args.output or Path("model.tar.gz"))
            output = args.output or Path("model.onnx")
            with atomic_file(output) as tmp:
                shutil.copyfile(graph, tmp)
            return {"onnx": str(output), "bytes": output.stat().st_size, "classes": len(predictor.spec.classes),
                    "temperature": predictor.calibration.temperature}
    from cnnpipe.serving.sagemaker import export

    predictor, top_k = load_registered(tracking, uri, args.calibration, args.tta, allow_unverified=args.allow_unverified)
    return export(predictor, top_k, args.output or Path("model.tar.gz"))


def _deploy(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    import tempfile

    from cnnpipe.serving.sagemaker import deploy

    name = args.endpoint_name or _cfg(RegisterConfig, "register", args, params, pp).model_name
    if args.backend == "onnxruntime" and not args.image_uri:
        raise CnnpipeError("deploy --backend onnxruntime: pass --image-uri, a container that installs "
                           "code/requirements.txt (AWS's framework containers do) or a lean image with onnxruntime")
    with tempfile.TemporaryDirectory() as d:
        archive = args.archive
        if archive is None:
            archive = Path(d) / "model.tar.gz"
            _export(argparse.Namespace(**{**vars(args), "target": "sagemaker", "output": archive, "tta": False}),
                    params, pp)
        return deploy(archive, args.role, args.instance_type, name, args.bucket, args.region, args.image_uri, args.wait)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnpipe", description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 ok, 1 internal error, 2 bad input, "
                                            "3 tracking store unreachable, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"cnnpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    def command(name: str, help: str, handler: Handler, cls: type | None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)  # `--epoch 5` is no `--epochs`
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
        p.add_argument("-S", "--set", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                       help="override any param for this run, as `dvc exp run -S` does (repeatable; one value may "
                            "hold several, space-separated): -S train.epochs=5 -S 'train.lr=0.1 train.arch=fastnet'")
        p.set_defaults(handler=handler)
        if cls is not None:
            add_flags(p, cls)
        return p

    def with_tracking(p: argparse.ArgumentParser, optional: bool) -> None:
        add_flags(p, TrackingConfig, prefix="tracking-")
        if optional:
            p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (runs without mlflow)")

    for stage in STAGES.values():
        p = command(stage.name, stage.help, _stage, stage.config)
        for port in stage.ports:
            p.add_argument(port.flag, dest=port.name, type=location_arg if port.remote else Path, default=Path(port.path),
                           help=f"{port.help}" + (", or its s3:// gs:// http(s):// URL" if port.remote else "")
                                + f" (default: {port.path})")
        for option in stage.options:
            kind = {"action": "store_true"} if isinstance(option.default, bool) else {"type": type(option.default)}
            p.add_argument(option.flag, dest=option.name, default=option.default, **kind,
                           help=option.help + ("" if isinstance(option.default, bool) else f" (default: {option.default})"))
        if stage.tracking != "none":
            with_tracking(p, optional=stage.tracking == "optional")

    p = command("promote", "compare the challenger with the champion on the test split; move `champion` if better",
                _promote, RegisterConfig)
    p.add_argument("--version", default="challenger", help="version number or alias to promote (default: challenger)")
    p.add_argument("--data", type=Path, default=Path("data/processed"), help="processed dataset (its test split)")
    p.add_argument("--force", action="store_true", help="promote without comparing")
    with_tracking(p, optional=False)

    p = command("rollback", "give `champion` back to the previous champion", _rollback, None)
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    with_tracking(p, optional=False)

    p = command("gc", "after a kill: mark runs whose process died KILLED, delete half-registered model versions, "
                      "report a stale training checkpoint", _gc, None)
    p.add_argument("--checkpoint", type=Path, default=Path("data/checkpoints/train.pt"),
                   help="train's checkpoint to report on (default: data/checkpoints/train.pt)")
    with_tracking(p, optional=False)

    p = command("serve", "serve a registered model over HTTP (SageMaker's /ping and /invocations)", _serve,
                ServeConfig)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080, as SageMaker)")
    p.add_argument("--calibration", type=Path, help=CALIBRATION_HELP)
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)
    with_tracking(p, optional=False)

    p = command("predict", "predict image files and folders with a registered model into a CSV", _predict, None)
    p.add_argument("paths", nargs="+", type=Path, help="image files, folders (searched recursively) or CSVs with a "
                                                       "'path' column and an optional 'box' column (x1 y1 x2 y2)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--output", type=Path, default=Path("predictions.csv"), help="CSV to write (default: predictions.csv)")
    p.add_argument("--batch-size", type=int, default=256, help="images per inference batch")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="inference engine (onnxruntime: the ONNX graph registered with the model, without torch)")
    p.add_argument("--calibration", type=Path, help=CALIBRATION_HELP)
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)
    with_tracking(p, optional=False)

    p = command("explain", "Grad-CAM of one image: where the model looked for the class it predicted (a PNG)",
                _explain, None)
    p.add_argument("image", type=Path, help="an image file (decoded and resized exactly as serving does)")
    p.add_argument("--model", help="a model URI models:/<name>@<alias>, or a model directory or file (from train) "
                                    "(default: models:/<register.model_name>@champion, as serve and predict)")
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--class", dest="class_name", help="explain this class instead of the predicted one")
    p.add_argument("--output", type=Path, help="the PNG to write (default: data/explain/<IMAGE's name>.gradcam.png, "
                                               "never beside the image: a data folder would take it as a photo)")
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)
    add_flags(p, TrackingConfig, prefix="tracking-")

    p = command("init", "write a complete, commented params.yaml for a dataset (a folder of photos, GTSRB, CIFAR-10, "
                        "pickles): its source, image size, the photo recipe for photos, its own model name; then "
                        "`dvc repro`", _init, None)
    p.set_defaults(reads_params=False)  # it writes --params (with -S values applied)
    p.add_argument("path", type=Path, help="the dataset: class folders, split folders (train/ val/ test/ of class "
                                           "folders), or an archive; see docs/photos.md")
    p.add_argument("--force", action="store_true", help="overwrite --params even when git does not hold it as it is")

    p = command("sweep", "train and evaluate a grid of train params as child runs of one MLflow run, "
                         "with a comparison table", _sweep, TrainConfig)
    p.add_argument("--grid", action="append", default=[], metavar="train.NAME=V1,V2",
                   help="an axis of the grid (repeatable; the runs are the cartesian product)")
    p.add_argument("--preset", choices=["study"], help="study: mlp vs cnn3, and cnn3 at widths 16/32/64/128")
    p.add_argument("--name", help="the parent run's name (default: sweep, or study)")
    p.add_argument("--data", type=Path, default=Path("data/processed"), help="processed dataset")
    p.add_argument("--augmented", type=Path, default=Path("data/augmented"), help="augmented dataset")
    p.add_argument("--out", type=Path, help="where the runs and the table go (default: data/sweeps/<name>)")
    with_tracking(p, optional=False)

    p = command("tune", "search params.yaml's tune.space with an Optuna study (pruned trials, MLflow child runs); "
                        "--apply writes the best trial into params.yaml", _tune, TuneConfig)
    p.add_argument("--apply", action="store_true",
                   help="write the study's best trial into --params (comments kept) instead of running trials")
    p.add_argument("--data", type=Path, default=Path("data/processed"), help="processed dataset (validation split)")
    p.add_argument("--augmented", type=Path, default=Path("data/augmented"),
                   help="augmented dataset (used as is unless an augment.* knob is tuned)")
    p.add_argument("--out", type=Path, help="trials, table and figures (default: data/tune/<study>)")
    with_tracking(p, optional=False)

    p = command("pipeline", "Kubeflow Pipelines: compile the pipeline, submit a run, or run it locally", _pipeline, None)
    p.add_argument("action", choices=["compile", "submit", "run-local"])
    p.add_argument("--output", type=Path,
                   help="compile: the YAML to write (default: pipeline.yaml; with --tune: katib-experiment.yaml)")
    p.add_argument("--tune", action="store_true",
                   help="compile: a Katib Experiment of the tune block's search instead of the pipeline")
    p.add_argument("--host", help="submit: the Kubeflow Pipelines API URL")
    p.add_argument("--experiment", help="submit: experiment name")
    p.add_argument("--run-name", help="submit: run name")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a param of this run as block.key=value (the pipeline's `overrides`, e.g. -p train.epochs=5), "
                        "the pipeline parameter tracking_uri or credentials_secret (compile: their defaults), or "
                        "the train step's nodes (default 1: one pod; more: a Kubeflow PyTorchJob of that many "
                        "nodes) and gpus_per_node (default 1; 0: CPU-only nodes); repeatable")
    p.add_argument("--no-cache", action="store_true", help="run every step, ignoring cached results")
    p.add_argument("--root", type=Path, default=Path("data/kfp"), help="run-local: where artifacts go")
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="run-local: components as subprocesses of this environment, or as containers of the image "
                        "(CNNPIPE_IMAGE) through Docker or podman's Docker API (DOCKER_HOST)")
    with_tracking(p, optional=False)

    p = command("export", "package a registered model for a serving platform (sagemaker: model.tar.gz; onnx: a "
                          "model.onnx for ONNX Runtime)", _export, None)
    p.add_argument("target", choices=["sagemaker", "onnx"], help="the platform")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--output", type=Path, help="file to write (default: model.tar.gz for sagemaker, model.onnx for onnx)")
    p.add_argument("--tta", action="store_true", help="sagemaker: the endpoint averages over the model's class-aware "
                                                      "flips (an ONNX file carries them; `serve --tta` uses them)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="sagemaker: TorchScript for AWS's PyTorch container, or the registered ONNX graph with a "
                        "torch-free handler (numpy, Pillow, onnxruntime)")
    p.add_argument("--calibration", type=Path, help=CALIBRATION_HELP)
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)
    with_tracking(p, optional=False)

    p = command("deploy", "deploy a registered model to a SageMaker real-time endpoint (boto3)", _deploy, None)
    p.add_argument("target", choices=["sagemaker"], help="the platform")
    p.add_argument("--role", required=True, help="IAM execution role ARN for the SageMaker model")
    p.add_argument("--instance-type", default="ml.m5.large", help="endpoint instance type (default ml.m5.large)")
    p.add_argument("--endpoint-name", help="endpoint (and model, endpoint config) name (default: the model name)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--archive", type=Path, help="an existing model.tar.gz instead of exporting the model")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="the archive to export (see `export sagemaker --backend`); onnxruntime needs --image-uri")
    p.add_argument("--calibration", type=Path, help=CALIBRATION_HELP)
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)
    p.add_argument("--bucket", help="S3 bucket for the archive (default: sagemaker-<region>-<account>)")
    p.add_argument("--region", help="AWS region (default: from the AWS configuration, else us-east-1)")
    p.add_argument("--image-uri", help="serving container (default: AWS's PyTorch 2.5.1 inference image)")
    p.add_argument("--wait", action="store_true", help="wait until the endpoint is InService")
    with_tracking(p, optional=False)
    return parser


class _Uncoloured:
    """stderr without the terminal colour codes libraries (MLflow's warnings, kfp's log) put in: a log file or
    CI log shows the words, not `\x1b[33m`."""

    ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

    def __init__(self, stream) -> None:  # noqa: ANN001 - a text stream
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(self.ANSI.sub("", text))

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else as the stream has it
        return getattr(self._stream, name)


def _medium_error(error: BaseException) -> str | None:
    """What a write failed on, when `error` (or what it wraps) is the medium's fault: a full disk or quota, a file
    size limit, a read-only mount (an OSError of fsio.WRITE_ERRNOS), or SQLite's "database or disk is full"."""
    from cnnpipe.fsio import WRITE_ERRNOS

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return f"cannot write{f' {error.filename!r}' if error.filename else ''}: {error.strerror or error}"
        if "database or disk is full" in str(error):
            return f"the tracking store cannot be written: database or disk is full ({str(error).splitlines()[0][:200]})"
        error = error.__cause__ or error.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if sys.stderr.isatty():
        return _main(args)
    # progress bars and colours are for terminals
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    stderr, sys.stderr = sys.stderr, _Uncoloured(sys.stderr)
    try:
        return _main(args)
    finally:
        sys.stderr = stderr


def _main(args: argparse.Namespace) -> int:
    try:
        params = apply_overrides(read_params(args.params), parse_assignments(args.set)) \
            if getattr(args, "reads_params", True) else {}
        result = args.handler(args, params, args.params)
    except CnnpipeError as e:
        print(f"cnnpipe {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"cnnpipe {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as e:  # an extra this command needs is not installed; anything else is a bug
        extra = EXTRA_OF_MODULE.get((e.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"cnnpipe {args.command}: error: this command needs {e.name}, which is not installed: "
              f"pip install 'cnnpipe[{extra}]'", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a full disk deep inside a library (MLflow's store, torch.save): one line, not a bug
        full = _medium_error(e)
        if full is None:
            raise
        print(f"cnnpipe {args.command}: error: {full}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # one results line for the job: under torchrun every rank returns here, and two ranks printing to one stdout
    # can interleave into a line no JSON parser reads
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result, default=str))
    return EXIT_OK
