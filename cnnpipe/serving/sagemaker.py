"""SageMaker: build model.tar.gz for the PyTorch serving container, serve it locally under the same
contract, and deploy it with boto3 (S3 upload, model, endpoint config, endpoint).

model.tar.gz layout (what SageMaker's PyTorch inference toolkit expects):
    model.pt               TorchScript of the network (normalization and class names are in metadata)
    metadata.json          classes, image size, channels, mean/std, default top_k, calibration temperature,
                           flip tables and whether the endpoint averages over them (test-time augmentation)
    code/inference.py      model_fn / input_fn / predict_fn / output_fn (cnnpipe/serving/contract.py)
    code/cnnpipe/          the torch-free modules inference.py imports (HANDLER_MODULES): preprocessing, calibration
    code/requirements.txt  what inference.py needs beyond the container's torch
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

import torch

import cnnpipe
from cnnpipe import calibration, errors, fsio, imaging
from cnnpipe.engine.predictor import Predictor
from cnnpipe.errors import CnnpipeError
from cnnpipe.fsio import atomic_file
from cnnpipe.serving import contract
from cnnpipe.serving.server import Invoke

# AWS's PyTorch inference containers (Deep Learning Containers); override with --image-uri
IMAGE_URI = "763104351884.dkr.ecr.{region}.amazonaws.com/pytorch-inference:2.5.1-{device}-py311-{cuda}ubuntu22.04-sagemaker"

# What code/inference.py (the contract) imports, copied beside it as the package `cnnpipe`: the container puts
# code/ on sys.path. Each imports only numpy, Pillow and these.
HANDLER_MODULES = (cnnpipe, errors, fsio, imaging, calibration)


def image_uri(region: str, instance_type: str) -> str:
    gpu = instance_type.split(".")[1][:1] in ("g", "p") if instance_type.count(".") >= 2 else False
    return IMAGE_URI.format(region=region, device="gpu" if gpu else "cpu", cuda="cu124-" if gpu else "")


def export(predictor: Predictor, top_k: int, output: Path) -> dict:
    """Write model.tar.gz (atomically) for `predictor`'s network."""
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
        (root / "code").mkdir()
        shutil.copy(contract.__file__, root / "code" / "inference.py")
        (root / "code" / "cnnpipe").mkdir()
        for module in HANDLER_MODULES:
            shutil.copy(Path(module.__file__), root / "code" / "cnnpipe" / Path(module.__file__).name)
        (root / "code" / "requirements.txt").write_text("numpy\npillow\n")
        with atomic_file(output) as tmp, tarfile.open(tmp, "w:gz") as tar:
            for name in ("model.pt", "metadata.json", "code"):
                tar.add(root / name, arcname=name)
    return {"archive": str(output), "bytes": output.stat().st_size, "classes": len(spec.classes),
            "temperature": predictor.calibration.temperature, "tta": predictor.tta,
            "tta_temperature": predictor.calibration.tta_temperature}


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
