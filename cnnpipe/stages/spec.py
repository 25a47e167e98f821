"""The pipeline's stages, declared once.

For each stage: its params block, its named inputs and outputs (keyword arguments of its `run`, with
the path dvc.yaml and the CLI use by default), its run options (train's checkpoint and resume), whether it talks
to MLflow, and the module whose keyword-only `run(cfg=..., <inputs>, <outputs>, <options>, tracking=...)` does
the work. The CLI builds its stage commands from this table and, like the KFP components, runs a stage through
`run_stage`: adding a port or an option touches this table and the stage only. The tests check dvc.yaml and
MLproject against it. `promote`, `rollback`, `sweep` and `tune` act on the registry or on many runs:
they are commands, not stages (cnnpipe.promotion, cnnpipe.search).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnpipe.config import (AugmentConfig, EvaluateConfig, IngestConfig, RegisterConfig, TrainConfig, apply_overrides,
                            load_block, parse_assignments)
from cnnpipe.remote import location_arg
from cnnpipe.tracking import tracking_settings


@dataclass(frozen=True)
class Port:
    """A file or folder a stage reads or writes."""

    name: str  # the keyword of the stage's run()
    path: str  # the default (dvc.yaml's and the CLI's)
    flag: str  # the CLI flag
    help: str
    remote: bool = False  # may be an s3:// gs:// http(s):// URL (train reads datasets from object storage)

    def location(self, value: Any) -> Any:  # noqa: ANN401 - a path, URL or what a caller built
        """A caller's value as the stage's run() takes it: a Path, or a URL kept as text where `remote`."""
        if not isinstance(value, str):
            return value
        return location_arg(value) if self.remote else Path(value)


@dataclass(frozen=True)
class Option:
    """A keyword of a stage's run() that is neither a params knob nor a file: how this one run goes."""

    name: str
    flag: str
    default: Any
    help: str


@dataclass(frozen=True)
class StageSpec:
    name: str  # also its params block and its `cnnpipe <name>` command
    config: type
    help: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    tracking: str  # "none", "optional" (--no-tracking runs without MLflow) or "required"
    options: tuple[Option, ...] = ()

    @property
    def module(self) -> str:
        return f"cnnpipe.stages.{self.name}"

    @property
    def ports(self) -> tuple[Port, ...]:
        return self.inputs + self.outputs


DATA = Port("data", "data/processed", "--data", "processed dataset directory (train/val/test)")
AUGMENTED = Port("augmented", "data/augmented", "--augmented", "augmented dataset directory (training split, policy)")
MODEL = Port("model", "data/model", "--model", "model directory (from train)")
EVALUATION = Port("evaluation", "data/evaluation", "--evaluation", "evaluation directory (metrics, figures, report)")


def _out(port: Port) -> Port:
    """The same port as a stage's output: the CLI spells every stage's main output --out."""
    return Port(port.name, port.path, "--out", port.help)


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("ingest", IngestConfig, "read a dataset source into the processed format (train/val/test)",
              inputs=(),
              outputs=(_out(DATA), Port("report", "data/reports/ingest_report.json", "--report",
                                        "ingest report (JSON): counts and unusable files")),
              tracking="none"),
    StageSpec("augment", AugmentConfig, "balance the training split and write the online augmentation policy",
              inputs=(DATA,), outputs=(_out(AUGMENTED),), tracking="none"),
    StageSpec("train", TrainConfig, "train a model on the augmented training split",
              inputs=(dataclasses.replace(DATA, remote=True), dataclasses.replace(AUGMENTED, remote=True)),
              outputs=(_out(MODEL),), tracking="optional",
              options=(Option("checkpoint", "--checkpoint", Path("data/checkpoints/train.pt"),
                              "training state saved after every epoch (removed when training succeeds)"),
                       Option("resume", "--resume", False, "continue an interrupted run from --checkpoint"))),
    StageSpec("evaluate", EvaluateConfig, "metrics and confusion matrix of a model on the val and test splits",
              inputs=(MODEL, DATA), outputs=(_out(EVALUATION),), tracking="optional"),
    StageSpec("register", RegisterConfig, "log the model as an MLflow pyfunc and register it in the Model Registry",
              inputs=(MODEL, DATA, EVALUATION),
              outputs=(Port("record", "data/registered.json", "--out", "registration record (JSON)"),),
              tracking="required"),
)}


def run_stage(name: str, params: dict[str, Any], *, overrides: list[str] = (), flags: dict[str, Any] | None = None,
              tracking_uri: str | None = None, tracking_experiment: str | None = None, no_tracking: bool = False,
              params_path: Path = Path("params.yaml"), **paths: Any) -> dict:
    """Run stage `name` with its block of `params`, after `overrides` (["train.epochs=5"], one per item) and
    `flags` (the CLI's, by field name; None: unset), on `paths`, one per port, plus any of its options: what
    every orchestrator calls. Tracking: `tracking_uri` / `tracking_experiment` win over MLFLOW_TRACKING_URI and
    params; `no_tracking` runs a stage whose tracking is optional without MLflow."""
    stage = STAGES[name]
    params = apply_overrides(params, parse_assignments(overrides, "override", one_per_item=True), "override")
    missing = {p.name for p in stage.ports} - set(paths)
    unknown = set(paths) - {p.name for p in stage.ports} - {o.name for o in stage.options}
    if missing or unknown:
        raise TypeError(f"stage {name}: missing paths {sorted(missing)}, unknown arguments {sorted(unknown)}")
    cfg = load_block(stage.config, name, params, flags or {}, params_path)
    kwargs: dict[str, Any] = {p.name: p.location(paths[p.name]) for p in stage.ports}
    kwargs |= {o.name: paths.get(o.name, o.default) for o in stage.options}
    if stage.tracking != "none":
        use = not (no_tracking and stage.tracking == "optional")
        kwargs["tracking"] = tracking_settings(params, tracking_uri or None, tracking_experiment, params_path) if use \
            else None
    return importlib.import_module(stage.module).run(cfg=cfg, **kwargs)
