import argparse
from pathlib import Path

import pytest

from cnnpipe.config import IngestConfig, TrackingConfig, TrainConfig, add_flags, load_block, read_params
from cnnpipe.errors import CnnpipeError
from cnnpipe.tracking import tracking_config
from tests.helpers import REPO

PP = Path("params.yaml")


def test_block_loads_and_flags_override():
    cfg = load_block(TrainConfig, "train", {"train": {"epochs": 3, "lr": "0.1"}}, {"epochs": 7, "arch": None}, PP)
    assert cfg.epochs == 7 and cfg.lr == 0.1 and cfg.arch == "cnn3"


@pytest.mark.parametrize("block, message", [
    ({}, "missing block 'train'"),
    ({"train": {"epochz": 3}}, "train.epochz is not a known field"),
    ({"train": {"epochs": "many"}}, "train.epochs: expected an integer, got 'many'"),
    ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
    ({"train": {"epochs": 0}}, "train.epochs: expected >= 1, got 0"),
    ({"train": {"optimizer": "lbfgs"}}, "train.optimizer: expected one of sgd, adamw, adam, got 'lbfgs'"),
    ({"train": {"augment": "maybe"}}, "train.augment: expected true or false"),
    ({"train": [1, 2]}, "block 'train' must be a mapping"),
])
def test_bad_params_name_the_field(block, message):
    with pytest.raises(CnnpipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_block(TrainConfig, "train", block, {}, PP)


def test_optional_field_accepts_null():
    assert load_block(IngestConfig, "ingest", {"ingest": {"path": None}}, {}, PP).path is None


def test_params_file_errors(tmp_path):
    with pytest.raises(CnnpipeError, match="not found"):
        read_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(CnnpipeError, match=r"is not valid YAML at line 2, column 1: "):
        read_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(CnnpipeError, match="mapping of blocks"):
        read_params(bad)


def test_flags_are_generated_from_fields():
    parser = argparse.ArgumentParser()
    add_flags(parser, TrainConfig)
    args = parser.parse_args(["--batch-size", "32", "--no-augment"])
    assert args.batch_size == 32 and args.augment is False and args.epochs is None


def test_tracking_precedence(monkeypatch):
    params = {"tracking": {"uri": "sqlite:///a.db"}}
    args = argparse.Namespace(tracking_uri=None, tracking_experiment=None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_config(params, args, PP).uri == "sqlite:///a.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_config(params, args, PP).uri == "sqlite:///env.db"
    args.tracking_uri = "sqlite:///flag.db"
    assert tracking_config(params, args, PP).uri == "sqlite:///flag.db"
    assert tracking_config({}, argparse.Namespace(), PP).experiment == TrackingConfig().experiment


def test_params_yaml_sets_every_knob_and_agrees_with_the_library_defaults():
    """params.yaml is the one place a user reads and changes defaults: it names every field of every block,
    with the value the config dataclasses (the library's API) default to."""
    import dataclasses

    from cnnpipe.config import BLOCKS

    params = read_params(REPO / "params.yaml")
    for block, cls in BLOCKS.items():
        assert set(params[block]) == {f.name for f in dataclasses.fields(cls)}, block
        assert load_block(cls, block, params, {}, PP) == cls(), block
    for recipe in sorted((REPO / "configs").glob("*.yaml")):  # full params files, to copy over params.yaml
        full = read_params(recipe)
        for block, cls in BLOCKS.items():
            assert set(full[block]) == {f.name for f in dataclasses.fields(cls)}, (recipe.name, block)
            load_block(cls, block, full, {}, recipe)


def test_overrides_use_one_syntax_and_name_what_is_wrong():
    from cnnpipe.config import apply_overrides, parse_assignments

    got = parse_assignments(["train.epochs=5", "train.lr=0.1 'ingest.path=/data/my photos.zip' ingest.sha256=null"])
    assert got == {"train.epochs": 5, "train.lr": 0.1, "ingest.path": "/data/my photos.zip", "ingest.sha256": None}
    assert parse_assignments([""]) == {}  # an unset MLproject parameter
    assert parse_assignments(["ingest.path=/a b.zip"], one_per_item=True) == {"ingest.path": "/a b.zip"}
    params = apply_overrides({"train": {"epochs": 12}}, {"train.epochs": 5, "register.model_name": "x"})
    assert params == {"train": {"epochs": 5}, "register": {"model_name": "x"}}
    with pytest.raises(CnnpipeError, match="train has no field 'epoch'"):
        apply_overrides({}, {"train.epoch": 5})
    with pytest.raises(CnnpipeError, match="unknown block 'trian'"):
        apply_overrides({}, {"trian.epochs": 5})
    with pytest.raises(CnnpipeError, match="expected block.key=value"):
        parse_assignments(["epochs=5"])


def test_params_schema_is_up_to_date_and_params_yaml_follows_it():
    import importlib.util
    import json

    import jsonschema
    import yaml

    spec = importlib.util.spec_from_file_location("params_schema", REPO / "scripts" / "params_schema.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.SCHEMA.read_text() == script.render(), "params.schema.json is stale: run python scripts/params_schema.py"
    text = (REPO / "params.yaml").read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=params.schema.json"
    schema = json.loads(script.render())
    jsonschema.validate(yaml.safe_load(text), schema)
    for bad in ({"train": {"epochs": 0}}, {"train": {"epochz": 3}}, {"ingest": {"resize": "crop"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_a_flag_prefix_is_not_taken_for_a_flag():
    from cnnpipe.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--epochs", "5"]).epochs == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--epoch", "5"])
