"""The pipeline's stages, declared once.

For each stage: its params block, its named inputs and outputs (keyword arguments of its `run`, with
the path dvc.yaml and the CLI use by default), whether it talks to MLflow, and the module whose
keyword-only `run(cfg=..., <inputs>, <outputs>, tracking=...)` does the work. The CLI builds its stage
commands from this table, the KFP components call `run_stage`, and the tests check dvc.yaml and
MLproject against it. `promote`, `rollback`, `sweep` and `tune` act on the registry or on many runs:
they are commands, not stages (cnnpipe.promotion, cnnpipe.search).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnpipe.config import (
    AugmentConfig,
    EvaluateConfig,
    IngestConfig,
    RegisterConfig,
    TrainConfig,
    apply_overrides,
    load_block,
    parse_assignments,
    tracking_settings,
)


@dataclass(frozen=True)
class Port:
    """A file or folder a stage reads or writes."""

    name: str  # the keyword of the stage's run()
    path: str  # the default (dvc.yaml's and the CLI's)
    flag: str  # the CLI flag
    help: str


@dataclass(frozen=True)
class StageSpec:
    name: str  # also its params block and its `cnnpipe <name>` command
    config: type
    help: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    tracking: str  # "none", "optional" (--no-tracking runs without MLflow) or "required"

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
              inputs=(DATA, AUGMENTED), outputs=(_out(MODEL),), tracking="optional"),
    StageSpec("evaluate", EvaluateConfig, "metrics and confusion matrix of a model on the val and test splits",
              inputs=(MODEL, DATA), outputs=(_out(EVALUATION),), tracking="optional"),
    StageSpec("register", RegisterConfig, "log the model as an MLflow pyfunc and register it in the Model Registry",
              inputs=(MODEL, DATA, EVALUATION),
              outputs=(Port("record", "data/registered.json", "--out", "registration record (JSON)"),),
              tracking="required"),
)}


def run_stage(name: str, params: dict[str, Any], *, overrides: list[str] = (),
              tracking_uri: str | None = None, params_path: Path = Path("params.yaml"), **paths: Any) -> dict:
    """Run stage `name` with its block of `params`, after `overrides` (["train.epochs=5"], one per item), on
    `paths`, one per port: what every orchestrator that is not the CLI (a KFP component) calls."""
    stage = STAGES[name]
    params = apply_overrides(params, parse_assignments(overrides, "override", one_per_item=True), "override")
    missing = {p.name for p in stage.ports} - set(paths)
    if missing:
        raise TypeError(f"stage {name}: missing paths {sorted(missing)}")
    cfg = load_block(stage.config, name, params, {}, params_path)
    kwargs: dict[str, Any] = {k: Path(v) for k, v in paths.items()}
    if stage.tracking != "none":
        kwargs["tracking"] = tracking_settings(params, tracking_uri or None, None, params_path)
    return importlib.import_module(stage.module).run(cfg=cfg, **kwargs)
