"""SageMaker: the exported archive's handler functions, the local contract server, and deployment
against a local AWS-compatible endpoint (moto in server mode on 127.0.0.1)."""

from __future__ import annotations

import functools
import json
import re
import tarfile
import urllib.request
from pathlib import Path

import pytest

from cnnpipe.config import ServeConfig
from cnnpipe.engine.checkpoint import ModelSpec, save_model
from cnnpipe.engine.predictor import Predictor
from cnnpipe.models import build_model
from cnnpipe.serving.sagemaker import contract_invoke, deploy, export, extract, image_uri, load_inference
from cnnpipe.serving.server import ServingApp, run_in_thread
from tests.helpers import free_port
from tests.formats import encoded, sign_image

CLASSES = ["stop", "yield", "keep left", "keep right"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, Predictor]:
    tmp = tmp_path_factory.mktemp("sm")
    spec = ModelSpec("fastnet", 8, 3, 4, 16, CLASSES, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    save_model(tmp / "model.pt", build_model("fastnet", 3, 4, 16, 8), spec)
    predictor = Predictor.from_file(tmp / "model.pt")
    export(predictor, 3, tmp / "model.tar.gz")
    return tmp / "model.tar.gz", predictor


def test_archive_has_the_layout_sagemaker_expects(archive):
    with tarfile.open(archive[0]) as tar:
        names = set(tar.getnames())
    assert {"model.pt", "metadata.json", "code/inference.py", "code/requirements.txt"} <= names


def test_the_four_handler_functions_on_real_images(archive, tmp_path):
    model_dir = extract(archive[0], tmp_path / "model")
    inference = load_inference(model_dir)
    # self-contained: every cnnpipe module the handler imports travels beside it in code/cnnpipe/
    imported = set(re.findall(r"^from cnnpipe\.(\w+) import", (model_dir / "code/inference.py").read_text(), re.M))
    assert imported and {f"{m}.py" for m in imported} <= {p.name for p in (model_dir / "code/cnnpipe").iterdir()}
    model = inference.model_fn(str(model_dir))
    from PIL import Image

    png = encoded(Image.fromarray(sign_image(1, 40, 38)), "PNG")
    jpeg = encoded(Image.fromarray(sign_image(2, 30, 30)), "JPEG")
    outputs = []
    for body, ctype in ((png, "image/png"), (jpeg, "image/jpeg"), (png, "application/x-image"),
                        (json.dumps({"instances": [__import__("base64").b64encode(png).decode()]}), "application/json")):
        data = inference.input_fn(body, ctype)
        prediction = inference.predict_fn(data, model)
        out = json.loads(inference.output_fn(prediction, "application/json"))
        assert len(out["predictions"]) == 1 and len(out["predictions"][0]["top_k"]) == 3
        outputs.append(out["predictions"][0])
    # the TorchScript endpoint answers as cnnpipe's own predictor does
    predictor = archive[1]
    ours = predictor.predict(predictor.preprocess([png]), top_k=3)[0]
    assert ours["predicted_class"] == outputs[0]["predicted_class"]
    assert ours["confidence"] == pytest.approx(outputs[0]["confidence"], abs=1e-5)
    with pytest.raises(ValueError, match="unsupported content type"):
        inference.input_fn(b"x", "text/csv")
    with pytest.raises(ValueError, match="not a readable image"):
        inference.predict_fn(inference.input_fn(b"garbage", "image/png"), model)


@pytest.mark.e2e
def test_local_contract_server(archive, tmp_path):
    model_dir = extract(archive[0], tmp_path / "model")
    base, stop = run_in_thread(ServingApp(functools.partial(contract_invoke, model_dir), ServeConfig()), ServeConfig())
    try:
        assert urllib.request.urlopen(f"{base}/ping", timeout=10).status == 200
        from PIL import Image

        req = urllib.request.Request(f"{base}/invocations", data=encoded(Image.fromarray(sign_image(3)), "PNG"),
                                     headers={"Content-Type": "image/png"}, method="POST")
        out = json.load(urllib.request.urlopen(req, timeout=30))
        assert out["predictions"][0]["predicted_class"] in CLASSES
        bad = urllib.request.Request(f"{base}/invocations", data=b"x", headers={"Content-Type": "text/csv"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=30)
        assert err.value.code == 415
    finally:
        stop()


def test_image_uri_follows_the_instance_type():
    assert image_uri("eu-west-1", "ml.m5.large").endswith("pytorch-inference:2.5.1-cpu-py311-ubuntu22.04-sagemaker")
    assert "2.5.1-gpu-py311-cu124-ubuntu22.04" in image_uri("us-east-1", "ml.g5.xlarge")
    assert image_uri("eu-west-1", "ml.m5.large").startswith("763104351884.dkr.ecr.eu-west-1.")


@pytest.mark.e2e
def test_deploy_creates_model_endpoint_config_and_endpoint(archive, moto):
    import boto3

    role = "arn:aws:iam::123456789012:role/SageMakerRole"
    out = deploy(archive[0], role, "ml.m5.large", "cnnpipe-test", None, None, None, wait=False)
    assert out["endpoint_name"] == "cnnpipe-test" and out["model_data"] == "s3://sagemaker-us-east-1-123456789012/cnnpipe/cnnpipe-test/model.tar.gz"
    sm, s3 = boto3.client("sagemaker"), boto3.client("s3")
    model = sm.describe_model(ModelName="cnnpipe-test")
    assert model["ExecutionRoleArn"] == role
    assert model["PrimaryContainer"]["ModelDataUrl"] == out["model_data"]
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    config = sm.describe_endpoint_config(EndpointConfigName="cnnpipe-test")
    assert config["ProductionVariants"][0]["InstanceType"] == "ml.m5.large"
    assert sm.describe_endpoint(EndpointName="cnnpipe-test")["EndpointConfigName"] == "cnnpipe-test"
    body = s3.get_object(Bucket="sagemaker-us-east-1-123456789012", Key="cnnpipe/cnnpipe-test/model.tar.gz")["Body"].read()
    assert body == archive[0].read_bytes()


@pytest.mark.e2e
def test_unreachable_aws_is_one_clear_error(archive, moto, monkeypatch):
    from cnnpipe.errors import CnnpipeError

    closed = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(CnnpipeError, match="SageMaker deployment failed: Could not connect to the endpoint URL"):
        deploy(archive[0], "arn:aws:iam::123456789012:role/R", "ml.m5.large", "x", None, None, None, wait=False)
