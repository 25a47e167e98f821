"""The benchmarks package: every benchmark imports and answers --help (none is run here: they take minutes
to hours, and their figures live in benchmarks/results), and the harness measures what it says."""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
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
    assert "test_accuracy_roi" not in scored  # no boxes, no crops: not the whole frames' score again


def test_a_run_is_scored_on_frames_cropped_to_their_boxes_as_evaluate_scores_them(tmp_path):
    """benchmarks/recipes.py's ROI score (what a user who crops to the sign sends) is evaluate's test_roi, and its
    whole-frame score evaluate's test, on a dataset whose boxes are random parts of each image."""
    from benchmarks.recipes import score
    from cnnpipe.config import AugmentConfig, EvaluateConfig, TrainConfig
    from cnnpipe.data.store import Split, read_dataset, write_dataset
    from cnnpipe.stages import augment, evaluate, train
    from tests.helpers import write_tiny_dataset

    tiny = read_dataset(write_tiny_dataset(tmp_path / "tiny", classes=3, size=16, n=30))
    rng = np.random.default_rng(0)

    def boxes(n: int) -> np.ndarray:
        corner = rng.uniform(0, 8, (n, 2))
        return np.concatenate([corner, corner + rng.uniform(4, 8, (n, 2))], axis=1).astype(np.float32)
    data = tmp_path / "processed"
    write_dataset(data, tiny.classes, {name: Split(s.images, s.labels, boxes(len(s.labels)))
                                       for name, s in tiny.splits.items()}, {"source": {"name": "tiny-boxed"}})
    augment.run(cfg=AugmentConfig(), data=data, augmented=tmp_path / "augmented")
    train.run(cfg=TrainConfig(epochs=2, width=4, augment=False), data=data, augmented=tmp_path / "augmented",
              model=tmp_path / "model", tracking=None)
    scored = score(tmp_path / "model", data)
    metrics = evaluate.run(cfg=EvaluateConfig(tsne_samples=0), model=tmp_path / "model", data=data,
                           evaluation=tmp_path / "evaluation", tracking=None)
    assert scored["test_accuracy"] == round(metrics["test"]["accuracy"], 5)
    assert scored["test_accuracy_roi"] == round(metrics["test_roi"]["accuracy"], 5)
    assert all(true != pred for true, pred, _ in scored["top_confusions_roi"])


def test_an_ensemble_is_scored_as_the_mean_of_its_members_outputs(tmp_path, monkeypatch):
    """benchmarks/ensemble.py on hand-made outputs (4 test images of classes 0-3): A is right on images 0 and 1,
    B on 2 and 3, their mean on all four; C's mean with A differs from their elementwise maximum. Every subset of
    the size asked is scored, plain and with TTA (their own outputs), and the gain is over the members' mean."""
    from benchmarks import ensemble

    labels = np.arange(4)
    plain = {"a": [[.6, .4, 0, 0], [0, .9, .1, 0], [0, 0, .4, .6], [.6, 0, 0, .4]],
             "b": [[.45, .55, 0, 0], [0, .45, 0, .55], [0, 0, .9, .1], [0, 0, .1, .9]],
             "c": [[.3, 0, .7, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0]]}
    # with TTA: A right everywhere, B wrong everywhere but with 0.4 on the right class, C all on class 2
    right, wrong = np.eye(4), np.roll(np.eye(4), 1, axis=1)
    tta = {"a": right, "b": 0.6 * wrong + 0.4 * right, "c": np.tile(np.eye(4)[2], (4, 1))}

    def outputs(model, processed):
        name = model.parent.name
        return np.asarray(plain[name], dtype=float), np.asarray(tta[name], dtype=float), labels

    monkeypatch.setattr(ensemble, "probabilities_on_test", outputs)
    result = ensemble.measure([tmp_path / n / "model" for n in "abc"], tmp_path / "processed", size=2)
    assert [(m["model"], m["accuracy"], m["errors"], m["accuracy_tta"]) for m in result["members"]] == [
        ("a", 0.5, 2, 1.0), ("b", 0.5, 2, 0.0), ("c", 0.25, 3, 0.25)]
    pairs = {tuple(e["models"]): e for e in result["ensembles"]}
    assert list(pairs) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert pairs["a", "b"]["accuracy"] == 1.0 and pairs["a", "b"]["errors"] == 0  # neither member alone
    assert pairs["a", "b"]["accuracy_tta"] == 1.0  # A's 1.0 + B's 0.4 on the right class beat B's 0.6
    # image 0: the mean of A and C says class 0 (0.45 against 0.35); their maximum would say class 2 (0.7)
    assert pairs["a", "c"]["accuracy"] == 0.5 and pairs["a", "c"]["top_confusions"] == [[1, 2, 1], [3, 2, 1]]
    assert pairs["a", "b"]["members_mean_accuracy"] == 0.5
    assert result["gain"]["mean"] == pytest.approx(((1.0 - 0.5) + (0.5 - 0.375) + (0.5 - 0.375)) / 3, abs=1e-5)


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


def test_a_points_runs_carry_what_the_docs_cite(tmp_path):
    """benchmarks.budget's flat `points` (what docs/templates address) keep each run's own figures: its flip-TTA
    accuracy and errors when it has them, nothing invented when it does not; the table shows the point's means."""
    import json

    from benchmarks import budget

    def run(seed: int, acc: float, **extra) -> dict:
        return {"seed": seed, "test_accuracy": acc, "val_accuracy_kept": 0.99, "kept_epoch": 3, "epochs_run": 3,
                "budget": {"actual_s": 59.5 + seed, "width": 32}, "code": "abc1234", **extra}
    point = {"test_accuracy": {"mean": 0.98, "std": 0.01, "n": 2}, "test_accuracy_tta": {"mean": 0.985, "std": 0.005,
             "n": 2}, "actual_s": {"mean": 60.0}, "within_5_percent": 2,
             "runs": [run(0, 0.97, test_accuracy_tta=0.98, test_errors=30, top_confusions=[[3, 5, 20]],
                          test_accuracy_roi=0.96, top_confusions_roi=[[1, 2, 9]]), run(1, 0.99)]}
    budget.save(tmp_path / "r.json", {"native": {"env": {}, "budgeted": {"60 split-1": point}, "fixed": {}}}, 2,
                ["python -m benchmarks.budget"], {"before": [], "after": []})
    saved = json.loads((tmp_path / "r.json").read_text())["points"]["native_60_split-1"]
    runs = saved["runs"]
    assert runs[0]["test_accuracy_tta"] == 0.98 and runs[0]["test_errors"] == 30
    assert runs[0]["top_confusions"] == [[3, 5, 20]] and runs[0]["width"] == 32
    assert runs[0]["test_accuracy_roi"] == 0.96 and runs[0]["top_confusions_roi"] == [[1, 2, 9]]
    assert "test_accuracy_tta" not in runs[1] and "test_errors" not in runs[1] and "test_accuracy_roi" not in runs[1]
    assert saved["test_accuracy_roi"] is None  # one run without it: no mean of some seeds under the point's name
    point["runs"][1].update(test_accuracy_roi=0.98)
    budget.save(tmp_path / "r.json", {"native": {"env": {}, "budgeted": {"60 split-1": point}, "fixed": {}}}, 2,
                ["python -m benchmarks.budget"], {"before": [], "after": []})
    assert json.loads((tmp_path / "r.json").read_text())["points"]["native_60_split-1"]["test_accuracy_roi"] == \
        pytest.approx(0.97)
    assert "| native | 60 s split-1 | 98.00 ± 1.00 % | 98.50 ± 0.50 % | 2 | 60.5 s | 2/2 | abc1234 |" in \
        (tmp_path / "r.md").read_text()


def test_a_peers_seeds_are_kept_and_summed_up_and_a_one_run_point_still_reads(tmp_path):
    """A peer's point keeps every seed's run and, under the keys a one-run point had (what docs/templates
    address), their mean; a point recorded before peers had seeds is read as its one run, in the table and in
    the epoch-time ratios."""
    import json

    from benchmarks import budget

    def run(seed: int, acc: float, epochs: int) -> dict:
        ends = [10.0 + 9.0 * e + seed for e in range(epochs)]  # epochs 9 s apart, the first 10 s
        return {"seed": seed, "test_accuracy": acc, "train_s": ends[-1], "epochs_run": epochs, "epochs_planned": 3,
                "epochs": [{"epoch": e + 1, "elapsed_s": t, "val_accuracy": 0.9} for e, t in enumerate(ends)]}
    seeded = budget.peer_point("users", [run(0, 0.90, 3), run(1, 0.92, 2), run(2, 0.94, 3)])
    assert seeded["test_accuracy"] == pytest.approx(0.92) and seeded["test_accuracy_std"] == pytest.approx(0.02)
    assert (seeded["seeds"], seeded["epochs_run"], seeded["epochs_run_min"]) == (3, 3, 2)
    assert [r["seed"] for r in budget.peer_runs(seeded)] == [0, 1, 2]
    one_run = {"what": "same", **run(0, 0.8, 1)}  # before seeds: the point is its run
    assert budget.peer_runs(one_run) == [one_run] and budget.peer_runs(None) == []
    fast = {"params_low_res_epochs": 0,
            "runs": [{"train_s": 9.0, "epochs": [{"epoch": e, "elapsed_s": 3.0 * e, "val_accuracy": 0.9} for e in (1, 2, 3)]}],
            "test_accuracy": {"mean": 0.99, "std": None, "n": 1}, "train_s": {"mean": 9.0}}
    point = {"test_accuracy": {"mean": 0.98, "std": None, "n": 1}, "actual_s": {"mean": 60.0}, "within_5_percent": 1,
             "runs": [{"seed": 0, "test_accuracy": 0.98, "val_accuracy_kept": 0.99, "kept_epoch": 3, "epochs_run": 3,
                       "budget": {"actual_s": 60.0}}]}
    results = {"native": {"env": {}, "budgeted": {"60": point}, "fixed": {"fast": fast},
                          "peers": {"users": {"60": seeded}, "same": {"60": one_run}}, "peer_epoch_s": {"same": 12.0}}}
    budget.save(tmp_path / "r.json", results, 2, ["python -m benchmarks.budget"], {"before": [], "after": []})
    table = (tmp_path / "r.md").read_text()
    assert "| 92.00 ± 2.00 % (3 seeds), 2-3 ep., 30 s | 80.00 % (1 seed), 1 ep., 10 s |" in table
    ratios = json.loads((tmp_path / "r.json").read_text())["results"]["native"]["epoch_time_ratios"]
    assert ratios["users"] == {"epoch_s": 9.0, "ratio": 3.0}  # between the seeded runs' epochs
    assert ratios["same"] == {"epoch_s": 12.0, "ratio": 4.0}  # one epoch: the probe's


def test_merging_adds_the_missing_seeds_and_drops_none():
    """--merge runs only the seeds a point lacks and keeps every seed it has, asked for or not."""
    from benchmarks import budget

    ran = []

    def run(seed: int) -> dict:
        ran.append(seed)
        return {"seed": seed, "new": True}
    kept = {0: {"seed": 0}, 2: {"seed": 2}}
    assert budget.merged_runs(dict(kept), 2, run) == [{"seed": 0}, {"seed": 1, "new": True}, {"seed": 2}]
    assert ran == [1]
    assert budget.merged_runs(dict(kept), 0, run) == [{"seed": 0}, {"seed": 2}] and ran == [1]
    assert budget.merged_runs({}, 2, run) == [{"seed": 0, "new": True}, {"seed": 1, "new": True}] and ran == [1, 0, 1]


def test_a_misread_track_is_probed_where_its_evidence_is(monkeypatch):
    """benchmarks/misread.py's pieces on hand-made frames: a crop fills the frame with each frame's own box, a
    squeeze narrows and keeps the height, contrast-normalized pixels ignore a dimming, neighbours are counted by
    class, and occlusion finds the patch whose pixels a scorer's wrong class rests on."""
    import torch

    from benchmarks import misread

    frames = np.zeros((2, 32, 32, 3), np.uint8)
    frames[0, 8:24, 16:24], frames[0, 8:24, 24:32] = 50, 200  # box x 16-32, y 8-24: left half 50, right half 200
    frames[1, 0:16, 0:16], frames[1, 16:32, 0:16] = 50, 200  # box x 0-16, y 0-32: top half 50, bottom half 200
    cropped = misread.to_box(frames, np.array([[16, 8, 32, 24], [0, 0, 16, 32]], np.float32))
    assert (cropped[0, 2:-2, 2:14] == 50).all() and (cropped[0, 2:-2, 18:30] == 200).all()
    assert (cropped[1, 2:14, 2:-2] == 50).all() and (cropped[1, 18:30, 2:-2] == 200).all()
    assert np.array_equal(misread.affine(frames), frames)
    bar = np.zeros((1, 32, 32, 3), np.uint8)
    bar[:, 8:24, 12:20] = 200  # 8 columns wide, 16 rows tall, off the edges
    lit = misread.affine(bar, sx=0.5)[0, :, :, 0] > 100
    assert 3 <= lit.any(axis=0).sum() <= 5 and lit.any(axis=1).sum() == 16

    texture = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    dimmed = (texture[:1] * 0.5).round().astype(np.uint8)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    vectors = misread.contrast_normalized(np.concatenate([texture, dimmed]), mean, std)
    assert vectors[0] @ vectors[2] > 0.98 and abs(vectors[0] @ vectors[1]) < 0.2
    monkeypatch.setattr(misread, "NEIGHBOURS", 3)
    pool, pool_labels = np.eye(4)[[0, 2, 0, 1, 3]], np.array([7, 9, 7, 8, 9])
    near = misread.nearest_classes(np.array([[1.0, 0.1, 0, 0], [0, 0.05, 0.1, 1.0]]), pool, pool_labels)
    assert near == {"k": 3, "of": 6, "classes": {7: 2, 8: 2, 9: 2}}  # 7, 7, 8 and 9, 9, 8

    def scorer(images):  # class 1's probability: the brightness of rows 20-28, columns 4-12
        p1 = images[:, 20:28, 4:12].mean(axis=(1, 2, 3)) / 255
        return np.stack([1 - p1, p1], 1), None

    spot = np.zeros((3, 32, 32, 3), np.uint8)
    spot[:, 20:28, 4:12] = 255
    found = misread.occlusion(scorer, spot, predicted=1)
    assert found["rows"] == [20, 28] and found["columns"] == [4, 12]
    assert found["p_predicted"] == 1.0 and found["p_predicted_occluded"] == 0.0
