"""The benchmarks package: every benchmark imports and answers --help (none is run here: they take minutes
to hours, and their figures live in benchmarks/results), and the harness measures what it says."""

from __future__ import annotations

import importlib
import math
import sys

import pytest

from benchmarks import harness
from tests.helpers import REPO

BENCHMARKS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("__init__", "harness"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_imports_and_has_help(name, monkeypatch, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_every_benchmark_is_in_the_index():
    index = (REPO / "benchmarks/README.md").read_text()
    for name in BENCHMARKS:
        assert f"python -m benchmarks.{name}" in index, name


def test_the_harness_measures_a_child():
    measured = harness.run([sys.executable, "-c", "b = bytearray(200 * 2**20); print('{\"mib\": 200}')"])
    assert measured.returncode == 0 and measured.json_line() == {"mib": 200}
    assert 200 <= measured.peak_rss_mb < 400  # the kernel's peak of the child: exact, not sampled
    assert measured.wall_s > 0 and len(measured.load_before) == len(measured.load_after) == 3
    failed = harness.run([sys.executable, "-c", "import sys; sys.exit(3)"], check=False)
    assert failed.returncode == 3
    result, measured = harness.run_callable(math.factorial, 20)
    assert result == math.factorial(20) and measured.peak_rss_mb > 1 and measured.wall_s > 0


def test_the_machine_is_recorded_with_what_decides_speed():
    info = harness.machine_info()
    assert {"cpu", "cpu_flags", "cores", "cores_usable", "versions"} <= set(info)
    assert set(info["cpu_flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"} and "torch" in info["versions"]


def test_a_run_is_scored_with_where_its_errors_are(tmp_path):
    """benchmarks/recipes.py's scoring of a model folder: its test errors agree with its accuracy, and the
    confusions are the most frequent wrong (true, predicted) pairs, largest first, with their counts."""
    from benchmarks.recipes import score
    from cnnpipe.config import AugmentConfig, TrainConfig
    from cnnpipe.data.store import read_dataset
    from cnnpipe.stages import augment, train
    from tests.helpers import write_tiny_dataset

    write_tiny_dataset(tmp_path / "processed", classes=4)
    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    # lr 0: a net at chance, so there are errors to place
    train.run(cfg=TrainConfig(epochs=1, width=4, lr=0.0, augment=False), data=tmp_path / "processed",
              augmented=tmp_path / "augmented", model=tmp_path / "model", tracking=None)
    scored = score(tmp_path / "model", tmp_path / "processed")
    n = len(read_dataset(tmp_path / "processed", splits=("test",)).splits["test"].labels)
    assert scored["test_errors"] == round((1 - scored["test_accuracy"]) * n) > 0
    confusions = scored["top_confusions"]
    assert 1 <= len(confusions) <= 3 and all(true != pred for true, pred, _ in confusions)
    counts = [count for *_, count in confusions]
    assert counts == sorted(counts, reverse=True) and sum(counts) <= scored["test_errors"]


def test_an_ensemble_is_scored_as_the_mean_of_its_members_outputs(tmp_path):
    """benchmarks/ensemble.py: every subset of the given size is scored; a model averaged with itself scores as it
    does alone (the mean of equal outputs), each member's figures are benchmarks/recipes.py's, and the gain is the
    ensemble's accuracy over its members' mean."""
    from benchmarks.ensemble import measure
    from benchmarks.recipes import score
    from cnnpipe.config import AugmentConfig, TrainConfig
    from cnnpipe.data.store import read_dataset
    from cnnpipe.stages import augment, train
    from tests.helpers import write_tiny_dataset

    write_tiny_dataset(tmp_path / "processed", classes=4)
    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    models = []
    for seed in (0, 1):
        models.append(tmp_path / f"run-{seed}" / "model")
        train.run(cfg=TrainConfig(epochs=1, width=4, seed=seed, augment=False), data=tmp_path / "processed",
                  augmented=tmp_path / "augmented", model=models[-1], tracking=None)
    result = measure([models[0], models[1], models[0]], tmp_path / "processed", size=2)
    alone = [score(model, tmp_path / "processed") for model in models]
    assert [m["accuracy"] for m in result["members"]] == [alone[0]["test_accuracy"], alone[1]["test_accuracy"],
                                                          alone[0]["test_accuracy"]]
    assert [m["errors"] for m in result["members"]][:2] == [a["test_errors"] for a in alone]
    assert len(result["ensembles"]) == 3  # (0, 1), (0, 0'), (1, 0')
    with_itself = result["ensembles"][1]
    assert with_itself["models"] == ["run-0", "run-0"] and with_itself["accuracy"] == alone[0]["test_accuracy"]
    n = len(read_dataset(tmp_path / "processed", splits=("test",)).splits["test"].labels)
    assert all(e["errors"] == round((1 - e["accuracy"]) * n) for e in result["ensembles"])
    gains = [e["accuracy"] - e["members_mean_accuracy"] for e in result["ensembles"]]
    assert result["gain"]["mean"] == pytest.approx(sum(gains) / 3, abs=1e-5)


def test_results_of_another_cpu_are_not_merged_into_or_rescored_in_place(tmp_path, monkeypatch):
    """`benchmarks.budget --merge` or `--rescore` into a file measured on a CPU with other flags would stamp this
    machine (and today) on that CPU's figures: it is refused before anything runs, and the file is left as it was."""
    import json

    from benchmarks import budget

    flags = harness.machine_info()["cpu_flags"]
    other = json.dumps({"machine": {"cpu_flags": {**flags, "avx512_bf16": not flags["avx512_bf16"]}}, "results": {}})
    (tmp_path / "r.json").write_text(other)
    (tmp_path / "gtsrb.zip").write_bytes(b"")  # never opened: the check comes first
    for flag in ("--merge", "--rescore"):
        monkeypatch.setattr(sys, "argv", ["budget", "--zip", str(tmp_path / "gtsrb.zip"), "--budgets", flag,
                                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r.json")])
        with pytest.raises(SystemExit) as exit_:
            budget.main()
        assert "measured on a CPU with other flags" in str(exit_.value.code), flag
        assert (tmp_path / "r.json").read_text() == other and not (tmp_path / "work").exists()
