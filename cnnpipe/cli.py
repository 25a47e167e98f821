"""`cnnpipe <stage>`: translate flags and params.yaml into one stage call; nothing more.

Each command prints its small result as JSON on stdout and progress on stderr. Exit codes:
0 ok, 1 internal error (a bug: traceback shown), 2 bad input, 3 tracking store unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from cnnpipe import __version__
from cnnpipe.config import (AugmentConfig, EvaluateConfig, IngestConfig, RegisterConfig, TrackingConfig, TrainConfig,
                            add_flags, load_block, read_params, sqlite_path, tracking_config)
from cnnpipe.errors import EXIT_INTERRUPTED, EXIT_OK, CnnpipeError

Handler = Callable[[argparse.Namespace, dict, Path], dict]


def _cfg(cls: type, block: str, args: argparse.Namespace, params: dict, params_path: Path):  # noqa: ANN202
    return load_block(cls, block, params, vars(args), params_path)


def _tracking(args: argparse.Namespace, params: dict, params_path: Path) -> TrackingConfig | None:
    if getattr(args, "no_tracking", False):
        return None
    return tracking_config(params, args, params_path)


def _ingest(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.stages import ingest

    return ingest.run(_cfg(IngestConfig, "ingest", args, params, pp), args.out, args.report)


def _augment(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.stages import augment

    return augment.run(_cfg(AugmentConfig, "augment", args, params, pp), args.data, args.out)


def _train(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.stages import train

    return train.run(_cfg(TrainConfig, "train", args, params, pp), args.data, args.augmented, args.out,
                     _tracking(args, params, pp), checkpoint=args.checkpoint, resume=args.resume)


def _evaluate(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.stages import evaluate

    return evaluate.run(_cfg(EvaluateConfig, "evaluate", args, params, pp), args.model, args.data, args.out,
                        _tracking(args, params, pp))


def _register(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.stages import register

    return register.run(_cfg(RegisterConfig, "register", args, params, pp), args.model, args.data, args.evaluation,
                        args.out, tracking_config(params, args, pp))


def _promote(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.stages import promote

    cfg = _cfg(RegisterConfig, "register", args, params, pp)
    return promote.promote(cfg, tracking_config(params, args, pp), cfg.model_name, args.version, args.data, args.force)


def _rollback(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.stages import promote

    return promote.rollback(tracking_config(params, args, pp), _cfg(RegisterConfig, "register", args, params, pp).model_name)


def _gc(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe import housekeeping

    return housekeeping.run(tracking=tracking_config(params, args, pp), checkpoint=args.checkpoint)


def _model_uri(args: argparse.Namespace, params: dict, pp: Path) -> str:
    return args.model or f"models:/{_cfg(RegisterConfig, 'register', args, params, pp).model_name}@champion"


def _serve(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.serving.local import load_registered, predictor_backend
    from cnnpipe.serving.server import cnnpipe_invoke, make_server, serve_forever

    uri = _model_uri(args, params, pp)
    predictor, top_k = load_registered(tracking_config(params, args, pp), uri)
    try:
        server = make_server(cnnpipe_invoke(predictor_backend(predictor, top_k)), args.host, args.port)
    except OSError as e:
        raise CnnpipeError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    serve_forever(server, uri)
    return {"served": uri, "stopped": True}


def _predict(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.serving.local import load_registered, predict_files

    predictor, _ = load_registered(tracking_config(params, args, pp), _model_uri(args, params, pp))
    return predict_files(predictor, args.paths, args.output, args.batch_size)


def _sweep(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.stages import sweep

    if bool(args.grid) == bool(args.preset):
        raise CnnpipeError("sweep: give --grid axes or --preset study (one of the two)")
    points = sweep.STUDY if args.preset == "study" else sweep.grid(args.grid)
    name = args.name or ("study" if args.preset else "sweep")
    evaluate_cfg = load_block(EvaluateConfig, "evaluate", params, {}, pp)
    return sweep.run(_cfg(TrainConfig, "train", args, params, pp), evaluate_cfg, tracking_config(params, args, pp),
                     args.data, args.augmented, args.out or Path(f"data/sweeps/{name}"), points, name)


def _pipeline(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from pipeline import training

    if args.action == "compile":
        return {"compiled": str(training.compile_pipeline(args.output, training.as_parameter(params)))}
    arguments = {"params": training.as_parameter(params)}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise CnnpipeError(f"-p {item!r}: expected key=value")
        arguments[key.replace("-", "_")] = value
    arguments = training.typed_arguments(arguments)
    if args.action == "submit":
        if not args.host:
            raise CnnpipeError("pipeline submit: --host (the Kubeflow Pipelines API URL) is required")
        return training.submit(args.host, arguments, args.experiment, args.run_name, not args.no_cache)
    uri = tracking_config(params, args, pp).uri
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():  # components run elsewhere: an absolute path
        uri = f"sqlite:///{db.resolve()}"
    return training.run_local({**arguments, "tracking_uri": arguments.get("tracking_uri", uri)}, args.root.resolve(),
                              not args.no_cache, args.runner)


def _export(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    from cnnpipe.serving.local import load_registered
    from cnnpipe.serving.sagemaker import export

    predictor, top_k = load_registered(tracking_config(params, args, pp), _model_uri(args, params, pp))
    return export(predictor, top_k, args.output)


def _deploy(args: argparse.Namespace, params: dict, pp: Path) -> dict:
    import tempfile

    from cnnpipe.serving.local import load_registered
    from cnnpipe.serving.sagemaker import deploy, export

    name = args.endpoint_name or _cfg(RegisterConfig, "register", args, params, pp).model_name
    with tempfile.TemporaryDirectory() as d:
        archive = args.archive
        if archive is None:
            predictor, top_k = load_registered(tracking_config(params, args, pp), _model_uri(args, params, pp))
            archive = Path(d) / "model.tar.gz"
            export(predictor, top_k, archive)
        return deploy(archive, args.role, args.instance_type, name, args.bucket, args.region, args.image_uri, args.wait)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnpipe", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit codes: 0 ok, 1 internal error, 2 bad input, "
                                            "3 tracking store unreachable, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"cnnpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    def command(name: str, help: str, handler: Handler, cls: type | None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
        p.set_defaults(handler=handler)
        if cls is not None:
            add_flags(p, cls)
        return p

    def with_tracking(p: argparse.ArgumentParser, optional: bool) -> None:
        add_flags(p, TrackingConfig, prefix="tracking-")
        if optional:
            p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (runs without mlflow)")

    p = command("ingest", "read a dataset source into the processed format (train/val/test)", _ingest, IngestConfig)
    p.add_argument("--out", type=Path, default=Path("data/processed"), help="processed dataset directory")
    p.add_argument("--report", type=Path, default=Path("data/reports/ingest_report.json"), help="ingest report (JSON)")

    p = command("augment", "balance the training split and write the online augmentation policy", _augment,
                AugmentConfig)
    p.add_argument("--data", type=Path, default=Path("data/processed"), help="processed dataset directory")
    p.add_argument("--out", type=Path, default=Path("data/augmented"), help="augmented dataset directory")

    p = command("train", "train a model on the augmented training split", _train, TrainConfig)
    p.add_argument("--data", type=Path, default=Path("data/processed"), help="processed dataset (validation split)")
    p.add_argument("--augmented", type=Path, default=Path("data/augmented"), help="augmented dataset (training split)")
    p.add_argument("--out", type=Path, default=Path("data/model"), help="model directory")
    p.add_argument("--checkpoint", type=Path, default=Path("data/checkpoints/train.pt"),
                   help="training state saved after every epoch (removed when training succeeds)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from --checkpoint")
    with_tracking(p, optional=True)

    p = command("evaluate", "metrics and confusion matrix of a model on the val and test splits", _evaluate,
                EvaluateConfig)
    p.add_argument("--model", type=Path, default=Path("data/model"), help="model directory (from train)")
    p.add_argument("--data", type=Path, default=Path("data/processed"), help="processed dataset directory")
    p.add_argument("--out", type=Path, default=Path("data/evaluation"), help="evaluation directory")
    with_tracking(p, optional=True)

    p = command("register", "log the model as an MLflow pyfunc and register it in the Model Registry", _register,
                RegisterConfig)
    p.add_argument("--model", type=Path, default=Path("data/model"), help="model directory (from train)")
    p.add_argument("--data", type=Path, default=Path("data/processed"), help="processed dataset (input example)")
    p.add_argument("--evaluation", type=Path, default=Path("data/evaluation"), help="evaluation directory")
    p.add_argument("--out", type=Path, default=Path("data/registered.json"), help="registration record (JSON)")
    with_tracking(p, optional=False)

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

    p = command("serve", "serve a registered model over HTTP (SageMaker's /ping and /invocations)", _serve, None)
    p.add_argument("--model", help="model URI (default: models:/<register.model_name>@champion)")
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080, as SageMaker)")
    with_tracking(p, optional=False)

    p = command("predict", "predict image files and folders with a registered model into a CSV", _predict, None)
    p.add_argument("paths", nargs="+", type=Path, help="image files or folders (searched recursively)")
    p.add_argument("--model", help="model URI (default: models:/<register.model_name>@champion)")
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--output", type=Path, default=Path("predictions.csv"), help="CSV to write")
    p.add_argument("--batch-size", type=int, default=256, help="images per inference batch")
    with_tracking(p, optional=False)

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

    p = command("pipeline", "Kubeflow Pipelines: compile the pipeline, submit a run, or run it locally", _pipeline, None)
    p.add_argument("action", choices=["compile", "submit", "run-local"])
    p.add_argument("--output", type=Path, default=Path("pipeline.yaml"), help="compile: the pipeline YAML to write")
    p.add_argument("--host", help="submit: the Kubeflow Pipelines API URL")
    p.add_argument("--experiment", help="submit: experiment name")
    p.add_argument("--run-name", help="submit: run name")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a pipeline parameter (source, path, dvc_repo, dvc_rev, arch, epochs, batch_size, lr, "
                        "model_name, promotion_metric, min_delta, tracking_uri, credentials_secret); repeatable")
    p.add_argument("--no-cache", action="store_true", help="run every step, ignoring cached results")
    p.add_argument("--root", type=Path, default=Path("data/kfp"), help="run-local: where artifacts go")
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="run-local: components as subprocesses of this environment, or as containers of the image "
                        "(CNNPIPE_IMAGE) through Docker or podman's Docker API (DOCKER_HOST)")
    with_tracking(p, optional=False)

    p = command("export", "package a registered model for a serving platform (sagemaker: model.tar.gz)", _export, None)
    p.add_argument("target", choices=["sagemaker"], help="the platform")
    p.add_argument("--model", help="model URI (default: models:/<register.model_name>@champion)")
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--output", type=Path, default=Path("model.tar.gz"), help="archive to write")
    with_tracking(p, optional=False)

    p = command("deploy", "deploy a registered model to a SageMaker real-time endpoint (boto3)", _deploy, None)
    p.add_argument("target", choices=["sagemaker"], help="the platform")
    p.add_argument("--role", required=True, help="IAM execution role ARN for the SageMaker model")
    p.add_argument("--instance-type", default="ml.m5.large", help="endpoint instance type (default ml.m5.large)")
    p.add_argument("--endpoint-name", help="endpoint (and model, endpoint config) name (default: the model name)")
    p.add_argument("--model", help="model URI (default: models:/<register.model_name>@champion)")
    p.add_argument("--model-name", help="registered model (default: register.model_name)")
    p.add_argument("--archive", type=Path, help="an existing model.tar.gz instead of exporting the model")
    p.add_argument("--bucket", help="S3 bucket for the archive (default: sagemaker-<region>-<account>)")
    p.add_argument("--region", help="AWS region (default: from the AWS configuration, else us-east-1)")
    p.add_argument("--image-uri", help="serving container (default: AWS's PyTorch 2.5.1 inference image)")
    p.add_argument("--wait", action="store_true", help="wait until the endpoint is InService")
    with_tracking(p, optional=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = read_params(args.params)
        result = args.handler(args, params, args.params)
    except CnnpipeError as e:
        print(f"cnnpipe {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"cnnpipe {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps(result, default=str))
    return EXIT_OK
