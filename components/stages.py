"""One KFP v2 component per stage (no `from __future__ import annotations` here: KFP reads the
artifact types of each signature at runtime). Each passes the pipeline's params (the text of a
params.yaml), the run's overrides (`train.epochs=5`: only what the user set) and its typed artifacts
to `cnnpipe.stages.spec.run_stage`, the call every orchestrator makes. Artifact names are the stage's
port names in cnnpipe.stages.spec (a test checks it); KFP-only views (Metrics, ClassificationMetrics,
HTML) are extra outputs.

Every component names the one image (IMAGE below; set CNNPIPE_IMAGE when compiling), with cnnpipe and
kfp installed in it, so nothing is installed at run time.
"""


import os

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

IMAGE = os.environ.get("CNNPIPE_IMAGE", "localhost/cnnpipe:0.1.0")
# What training gets: the single train pod, or each node of a multi-node training job
TRAIN_CPU, TRAIN_MEMORY = "8", "32G"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(params: str, overrides: list, data: Output[Dataset], report: Output[Artifact]):
    import yaml

    from cnnpipe.stages.spec import run_stage

    summary = run_stage("ingest", yaml.safe_load(params), overrides=overrides, data=data.path,
                        report=report.path)
    data.metadata.update({"images": summary["images"], "classes": summary["classes"], "source": summary["source"],
                          **({"dvc_commit": summary["dvc"]["commit"]} if "dvc" in summary else {})})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def augment(params: str, overrides: list, data: Input[Dataset], augmented: Output[Dataset]):
    import yaml

    from cnnpipe.stages.spec import run_stage

    augmented.metadata.update(run_stage("augment", yaml.safe_load(params), overrides=overrides,
                                        data=data.path, augmented=augmented.path))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(params: str, overrides: list, tracking_uri: str, data: Input[Dataset], augmented: Input[Dataset],
          model: Output[Model]):
    import yaml

    from cnnpipe.stages.spec import run_stage

    result = run_stage("train", yaml.safe_load(params), overrides=overrides,
                       tracking_uri=tracking_uri, data=data.path, augmented=augmented.path, model=model.path)
    model.metadata.update({k: v for k, v in result.items() if v is not None})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_job(params: str, overrides: list, tracking_uri: str, credentials_secret: str, job: str,
              data: Input[Dataset], augmented: Input[Dataset], model: Output[Model]):
    """train on several nodes: `job` is the Kubeflow PyTorchJob compiled into the pipeline (pipeline.trainjob);
    this step starts it for this run, waits for it, and outputs its model folder as `train` does."""
    import json
    from pathlib import Path

    import yaml

    from cnnpipe.pipeline import trainjob

    result = trainjob.run(json.loads(job), params=yaml.safe_load(params), overrides=overrides,
                          tracking_uri=tracking_uri, credentials_secret=credentials_secret, data_uri=data.uri,
                          augmented_uri=augmented.uri, model_uri=model.uri, model_dir=Path(model.path))
    model.metadata.update({k: v for k, v in result.items() if v is not None})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(params: str, overrides: list, tracking_uri: str, model: Input[Model], data: Input[Dataset],
             evaluation: Output[Artifact], metrics: Output[Metrics], classification: Output[ClassificationMetrics],
             report: Output[HTML]):
    import json
    import shutil
    from pathlib import Path

    import yaml

    from cnnpipe.evaluation.folder import CONFUSION_JSON, REPORT_HTML
    from cnnpipe.stages.spec import run_stage

    scores = run_stage("evaluate", yaml.safe_load(params), overrides=overrides,
                       tracking_uri=tracking_uri, model=model.path, data=data.path, evaluation=evaluation.path)
    for split, values in scores.items():
        for name, value in values.items():
            metrics.log_metric(f"{split}/{name}", value)
    cm = json.loads((Path(evaluation.path) / CONFUSION_JSON).read_text())
    classification.log_confusion_matrix(cm["categories"], cm["matrix"])
    shutil.copy(Path(evaluation.path) / REPORT_HTML, report.path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(params: str, overrides: list, tracking_uri: str, model: Input[Model], data: Input[Dataset],
             evaluation: Input[Artifact], record: Output[Artifact]) -> str:
    import yaml

    from cnnpipe.stages.spec import run_stage

    registration = run_stage("register", yaml.safe_load(params), overrides=overrides,
                             tracking_uri=tracking_uri, model=model.path, data=data.path,
                             evaluation=evaluation.path, record=record.path)
    return registration["model_uri"]
