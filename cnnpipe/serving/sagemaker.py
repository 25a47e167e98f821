"""SageMaker: build model.tar.gz for the PyTorch serving container, or a torch-free one for ONNX Runtime, serve
it locally under the same contract, and deploy it with boto3 (S3 upload, model, endpoint config, endpoint).

model.tar.gz layout (what SageMaker's inference toolkits expect), torch:
    model.pt               TorchScript of the network (normalization and class names are in metadata)
    metadata.json          classes, image size, channels, mean/std, default top_k, calibration temperature,
                           flip tables and whether the endpoint averages over them (test-time augmentation)
    code/inference.py      model_fn / input_fn / predict_fn / output_fn (cnnpipe/serving/contract.py)
    code/cnnpipe/          the torch-free modules inference.py imports (HANDLER_MODULES): preprocessing, calibration
    code/requirements.txt  what inference.py needs beyond the container's torch
onnxruntime (no torch anywhere: any framework container that installs code/requirements.txt, or a lean image):
    model.onnx             the graph `register` exported (spec, calibration, top_k in its metadata)
    serving.json           {"tta": whether the endpoint averages over the flips the graph carries}
    code/inference.py      cnnpipe/serving/onnx_handler.py, with the modules it imports (ONNX_HANDLER_MODULES)
    code/requirements.txt  numpy, pillow, onnxruntime
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

from typing import TYPE_CHECKING

import cnnpipe
from cnnpipe import calibration, engine, errors, fsio, imaging, serving
from cnnpipe.engine import spec
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_file
from cnnpipe.serving import contract, onnx_handler, onnx_runtime
from cnnpipe.serving.server import Invoke

if TYPE_CHECKING:
    from cnnpipe.engine.predictor import Predictor

# AWS's PyTorch inference containers (Deep Learning Containers); override with --image-uri
IMAGE_URI = "763104351884.dkr.ecr.{region}.amazonaws.com/pytorch-inference:2.5.1-{device}-py311-{cuda}ubuntu22.04-sagemaker"

# What code/inference.py (the contract) imports, copied beside it as the package `cnnpipe`: the container puts
# code/ on sys.path. Each imports only numpy, Pillow and these.
HANDLER_MODULES = (cnnpipe, errors, fsio, imaging, calibration)
# ... and the ONNX handler's (at their paths inside the package: it imports cnnpipe.serving.contract, ...)
ONNX_HANDLER_MODULES = (*HANDLER_MODULES, serving, contract, onnx_runtime, engine, spec)


def image_uri(region: str, instance_type: str) -> str:
    gpu = instance_type.split(".")[1][:1] in ("g", "p") if instance_type.count(".") >= 2 else False
    return IMAGE_URI.format(region=region, device="gpu" if gpu else "cpu", cuda="cu124-" if gpu else "")


def export(predictor: Predictor, top_k: int, output: Path) -> dict:
    """Write model.tar.gz (atomically) for `predictor`'s network."""
    import torch

    spec = predictor.spec
    model = predictor.model.eval().cpu()
    example = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        with warnings.catch_warnings():
            # torch 2.15 deprecates tracing; TorchScript is still what every SageMaker PyTorch 2.x container loads
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, example)
        torch.jit.save(traced, root / "model.pt")
        meta = {"classes": spec.classes, "image_size": spec.image_size, "channels": spec.in_channels,
                "mean": spec.mean, "std": spec.std, "top_k": top_k, "arch": spec.arch,
                "resize": spec.resize, "temperature": predictor.calibration.temperature,
                "flips": predictor.calibration.flips, "tta": predictor.tta,
                "tta_temperature": predictor.calibration.tta_temperature}
        (root / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        _write_code(root / "code", contract, HANDLER_MODULES, "numpy\npillow\n")
        _write_archive(output, root, ("model.pt", "metadata.json", "code"))
    return {"archive": str(output), "bytes": output.stat().st_size, "classes": len(spec.classes),
            "temperature": predictor.calibration.temperature, "tta": predictor.tta,
            "tta_temperature": predictor.calibration.tta_temperature}


def export_onnx_archive(graph: Path, tta: bool, output: Path) -> dict:
    """Write model.tar.gz (atomically) for the ONNX graph `graph` (from `register` or `export_onnx`): no torch in
    it or needed to run it; `tta`: the endpoint averages over the flips the graph carries."""
    predictor = onnx_runtime.OnnxPredictor(graph, tta=tta)  # a readable graph of cnnpipe's, or one clear error
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        shutil.copyfile(graph, root / onnx_runtime.ONNX_FILE)
        (root / onnx_handler.SETTINGS_FILE).write_text(json.dumps({"tta": predictor.tta}) + "\n")
        _write_code(root / "code", onnx_handler, ONNX_HANDLER_MODULES, "numpy\npillow\nonnxruntime\n")
        _write_archive(output, root, (onnx_runtime.ONNX_FILE, onnx_handler.SETTINGS_FILE, "code"))
    return {"archive": str(output), "bytes": output.stat().st_size, "backend": "onnxruntime",
            "classes": len(predictor.spec.classes), "temperature": predictor.calibration.temperature, "tta": predictor.tta}


def _write_code(code: Path, handler: ModuleType, modules: tuple[ModuleType, ...], requirements: str) -> None:
    """code/: `handler` as inference.py, `modules` at their paths under code/cnnpipe/, requirements.txt."""
    package = Path(cnnpipe.__file__).parent
    for module in modules:
        target = code / "cnnpipe" / Path(module.__file__).relative_to(package)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(module.__file__), target)
    shutil.copy(handler.__file__, code / "inference.py")
    (code / "requirements.txt").write_text(requirements)


def _write_archive(output: Path, root: Path, names: tuple[str, ...]) -> None:
    with atomic_file(output) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for name in names:
            tar.add(root / name, arcname=name)


def load_inference(model_dir: Path) -> ModuleType:
    """Import code/inference.py of an extracted model.tar.gz, as the serving container does."""
    spec = importlib.util.spec_from_file_location("sagemaker_inference", model_dir / "code" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extract(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")  # the data filter refuses members that escape `into`
    return into


def contract_invoke(model_dir: Path) -> Invoke:
    """/invocations as the container runs it: input_fn -> predict_fn -> output_fn of inference.py."""
    inference = load_inference(model_dir)
    model = inference.model_fn(str(model_dir))

    def invoke(body: bytes, content_type: str, query: dict) -> tuple[int, dict]:
        try:
            data = inference.input_fn(body, content_type)
            return 200, json.loads(inference.output_fn(inference.predict_fn(data, model), "application/json"))
        except ValueError as e:  # the contract's RequestError, or a malformed request
            return getattr(e, "status", 400), {"error": str(e)}
    return invoke


def deploy(archive: Path, role: str, instance_type: str, endpoint_name: str, bucket: str | None, region: str | None,
           image: str | None, wait: bool) -> dict:
    """Upload the archive and create the SageMaker model, endpoint config and endpoint (credentials and
    endpoint URLs from boto3's standard chain: env, ~/.aws, instance role; AWS_ENDPOINT_URL included)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        session = boto3.session.Session(region_name=region)
        region = session.region_name or "us-east-1"
        account = session.client("sts").get_caller_identity()["Account"]
        bucket = bucket or f"sagemaker-{region}-{account}"
        s3 = session.client("s3")
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError:
            s3.create_bucket(Bucket=bucket, **({} if region == "us-east-1" else
                                               {"CreateBucketConfiguration": {"LocationConstraint": region}}))
        key = f"cnnpipe/{endpoint_name}/model.tar.gz"
        s3.upload_file(str(archive), bucket, key)
        sm = session.client("sagemaker")
        image = image or image_uri(region, instance_type)
        sm.create_model(ModelName=endpoint_name, ExecutionRoleArn=role, PrimaryContainer={
            "Image": image, "ModelDataUrl": f"s3://{bucket}/{key}",
            "Environment": {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code"}})
        sm.create_endpoint_config(EndpointConfigName=endpoint_name, ProductionVariants=[{
            "VariantName": "AllTraffic", "ModelName": endpoint_name, "InitialInstanceCount": 1,
            "InstanceType": instance_type}])
        arn = sm.create_endpoint(EndpointName=endpoint_name, EndpointConfigName=endpoint_name)["EndpointArn"]
        if wait:
            print(f"waiting for endpoint {endpoint_name} to be InService ...", file=sys.stderr)
            sm.get_waiter("endpoint_in_service").wait(EndpointName=endpoint_name)
        status = sm.describe_endpoint(EndpointName=endpoint_name)["EndpointStatus"]
    except (BotoCoreError, ClientError) as e:
        raise CnnpipeError(f"SageMaker deployment failed: {e}") from None
    return {"endpoint_name": endpoint_name, "endpoint_arn": arn, "status": status, "model_data": f"s3://{bucket}/{key}",
            "image": image, "region": region}
