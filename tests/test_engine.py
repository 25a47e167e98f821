import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cnnpipe.augment import AugmentPolicy, no_flips
from cnnpipe.config import AugmentConfig, TrainConfig
from cnnpipe.engine.checkpoint import ModelSpec, load_checkpoint, load_model, save_checkpoint, save_model
from cnnpipe.engine.inference import stats_tensors, to_nchw_uint8
from cnnpipe.engine.loop import EMA, TrainData, fit, lr_factor, sharpness_aware_gradients
from cnnpipe.engine.model_folder import CONFIG_FILE
from cnnpipe.errors import CnnpipeError
from cnnpipe.models import build_model
from tests.helpers import REPO, make_images, write_tiny_dataset


def tiny_data(size=8, n=20) -> TrainData:
    xtr, ytr = make_images(n, 3, size, 1, seed=0)
    xva, yva = make_images(6, 3, size, 1, seed=1)
    mean, std = stats_tensors([0.3], [0.3], torch.device("cpu"))
    return TrainData(to_nchw_uint8(xtr, "cpu"), torch.from_numpy(ytr), to_nchw_uint8(xva, "cpu"),
                     torch.from_numpy(yva), mean, std)


def strip_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if "seconds" not in k and "per_s" not in k} for e in history]


def test_fit_learns_and_repeats_for_a_seed():
    cfg = TrainConfig(arch="cnn3", width=8, epochs=6, batch_size=16, lr=0.05)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("cnn3", 1, 3, 8, 8)
        runs.append(fit(model, tiny_data(), cfg, policy=None).history)
    assert runs[0][-1]["val/accuracy"] > 0.9
    assert runs[0][-1]["train/loss"] < runs[0][0]["train/loss"]
    assert strip_timing(runs[0]) == strip_timing(runs[1])


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "constant"])
def test_schedules_start_peak_and_end_as_documented(schedule):
    f = [lr_factor(schedule, s, 100) for s in range(101)]
    assert max(f) == pytest.approx(1.0) and all(0 <= v <= 1 for v in f)
    if schedule != "constant":
        assert f[-1] < 0.05


def test_model_file_roundtrip_uses_weights_only(tmp_path):
    model = build_model("cnn3", 1, 3, 8, 8)
    spec = ModelSpec("cnn3", 8, 1, 3, 8, ["a", "b", "c"], [0.5], [0.25])
    save_model(tmp_path / "model.pt", model, spec)
    loaded, spec2 = load_model(tmp_path / "model.pt")
    assert spec2 == spec
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    assert torch.allclose(model(x), loaded(x))
    # a file that would need full unpickling is refused, not executed
    torch.save({"format": "cnnpipe.model/1", "spec": dataclasses.asdict(spec), "state_dict": model.state_dict(),
                "payload": np.array([1])}, tmp_path / "evil.pt")
    with pytest.raises(CnnpipeError, match="not a readable cnnpipe model"):
        load_model(tmp_path / "evil.pt")


def test_corrupt_or_missing_model_file(tmp_path):
    with pytest.raises(CnnpipeError, match="not found"):
        load_model(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(CnnpipeError, match="bad.pt.*not a readable cnnpipe model"):
        load_model(tmp_path / "bad.pt")


@pytest.mark.parametrize("mixing", [{}, {"mixup": 0.4, "cutmix": 1.0}, {"sam_rho": 0.05}, {"val_every": 3}],
                         ids=["plain", "mixup-cutmix", "sam", "val-every-3"])
def test_resume_from_a_checkpoint_repeats_the_uninterrupted_run(mixing):
    cfg = TrainConfig(arch="cnn3", width=8, epochs=4, batch_size=16, lr=0.05, ema=0.9, **mixing)
    policy = AugmentPolicy(translate=0.1, rotate=10, scale=0.1, shear=0, brightness=0.2, contrast=0.2, saturation=0,
                           cutout=0.2, hflip=no_flips(3))
    torch.manual_seed(0)
    full = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, policy)
    states = []
    torch.manual_seed(0)
    fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), dataclasses.replace(cfg), policy,
        checkpoint=lambda st: states.append(copy.deepcopy(st)))
    assert [s["epoch"] for s in states] == [1, 2, 3, 4]
    resumed = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, policy, resume=states[1])  # killed after epoch 2
    assert strip_timing(resumed.history) == strip_timing(full.history)
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_keeps_the_best_epoch():
    cfg = TrainConfig(arch="cnn3", width=8, epochs=30, batch_size=16, lr=0.05, schedule="constant",
                      early_stopping_patience=2, early_stopping_metric="val/loss")
    torch.manual_seed(0)
    result = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, policy=None)
    losses = [e["val/loss"] for e in result.history]
    assert result.stopped_early and len(losses) == result.best_epoch + 2
    assert losses[result.best_epoch - 1] == min(losses)
    data = tiny_data()
    from cnnpipe.engine.loop import evaluate_split

    assert evaluate_split(result.model, data.val_images, data.val_labels, data.mean, data.std)[0] == \
        pytest.approx(min(losses), rel=1e-5)


def test_checkpoint_errors(tmp_path):
    cfg = dataclasses.asdict(TrainConfig(epochs=3))
    with pytest.raises(CnnpipeError, match="no checkpoint at .* to resume from"):
        load_checkpoint(tmp_path / "none.pt", cfg)
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CnnpipeError, match="checkpoint '.*bad.pt' is corrupt"):
        load_checkpoint(tmp_path / "bad.pt", cfg)
    save_checkpoint(tmp_path / "ok.pt", {"epoch": 1, "config": {**cfg, "epochs": 5}})
    with pytest.raises(CnnpipeError, match="written with train.epochs=5, this run has 3"):
        load_checkpoint(tmp_path / "ok.pt", cfg)
    assert load_checkpoint(tmp_path / "ok.pt", {**cfg, "epochs": 5, "device": "cuda"})["epoch"] == 1
    # a checkpoint from before a knob existed resumes when the run leaves that knob at its default
    save_checkpoint(tmp_path / "older.pt", {"epoch": 1, "config": {k: v for k, v in cfg.items() if k != "train_on_val"}})
    assert load_checkpoint(tmp_path / "older.pt", cfg)["epoch"] == 1
    with pytest.raises(CnnpipeError, match="written with train.train_on_val=None, this run has True"):
        load_checkpoint(tmp_path / "older.pt", {**cfg, "train_on_val": True})


@pytest.mark.e2e
def test_engine_imports_and_trains_without_mlflow(tmp_path):
    """The training loop must run on a bare GPU box: no mlflow, dvc or kfp importable."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "dvc", "kfp"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from pathlib import Path
from cnnpipe.config import TrainConfig
from cnnpipe.stages import train
from tests.helpers import write_tiny_dataset
from cnnpipe.stages import augment
from cnnpipe.config import AugmentConfig
d = Path(sys.argv[1])
write_tiny_dataset(d / "processed")
augment.run(cfg=AugmentConfig(), data=d / "processed", augmented=d / "augmented")
r = train.run(cfg=TrainConfig(epochs=1, width=4), data=d / "processed", augmented=d / "augmented", model=d / "model",
              tracking=None)
assert r["epochs"] == 1 and (d / "model" / "model.pt").exists()
assert not any(m.split(".")[0] in ("mlflow", "dvc", "kfp") for m in sys.modules)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("extra", [[], ["--sam-rho", "0.05"]], ids=["plain", "sam"])
def test_ddp_trains_with_two_cpu_processes(tmp_path, extra):
    """The DistributedDataParallel path under torchrun, on CPU with the gloo backend (SAM: its second pass too)."""
    write_tiny_dataset(tmp_path / "processed", n=24)
    from cnnpipe.config import AugmentConfig
    from cnnpipe.stages import augment

    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "cnnpipe", "train", "--params",
         str(REPO / "params.yaml"), "--no-tracking", "--epochs", "2", "--width", "4", "--batch-size", "16",
         "--data", str(tmp_path / "processed"), "--augmented", str(tmp_path / "augmented"),
         "--out", str(tmp_path / "model"), "--checkpoint", str(tmp_path / "ckpt.pt"), *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr and proc.stderr.count("epoch 2/2") == 1  # only rank 0 reports
    assert len(proc.stdout.strip().splitlines()) == 1 and json.loads(proc.stdout)["epochs"] == 2  # one results line
    model, spec = load_model(tmp_path / "model" / "model.pt")
    assert spec.num_classes == 3 and not (tmp_path / "ckpt.pt").exists()


def test_threads_follow_the_request_or_the_available_cores():
    from cnnpipe.engine.device import available_cores, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(3) == 3 and torch.get_num_threads() == 3
        assert set_threads(0, processes=1) == available_cores() >= 1
        assert set_threads(0, processes=1000) == 1  # never zero threads
    finally:
        torch.set_num_threads(before)


def test_precision_picks_the_autocast_and_falls_back_where_bf16_is_emulated(monkeypatch):
    from cnnpipe.engine.device import autocast

    cpu = torch.device("cpu")
    assert autocast(cpu, "auto") == (contextlib.nullcontext, "fp32")  # CPU runs repeat exactly
    mixed, precision = autocast(torch.device("cuda"), "auto")  # bf16 on tensor cores
    assert precision == "bf16" and isinstance(mixed(), torch.autocast)
    assert autocast(torch.device("cuda"), "fp32")[1] == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert autocast(cpu, "bf16")[1] == "fp32"  # emulated bf16 is slower than fp32 (the train stage says so)


@pytest.mark.skipif(not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
                    reason="this CPU has no native bf16")
def test_bf16_training_on_cpu_learns():
    cfg = TrainConfig(arch="cnn3", width=8, epochs=6, batch_size=16, lr=0.05, precision="bf16")
    torch.manual_seed(0)
    history = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, policy=None).history
    assert history[-1]["val/accuracy"] > 0.9 and history[-1]["train/loss"] < history[0]["train/loss"]


def test_progressive_resizing_trains_the_first_epochs_at_low_res():
    cfg = TrainConfig(arch="fastnet", width=8, epochs=3, batch_size=16, lr=0.05, low_res=8, low_res_epochs=2)
    torch.manual_seed(0)
    model = build_model("fastnet", 1, 3, 16, 8)
    sizes: list[tuple[bool, int]] = []  # (training, input size) of every forward pass
    model.register_forward_pre_hook(lambda m, args: sizes.append((m.training, args[0].shape[-1])))
    result = fit(model, tiny_data(size=16), cfg, policy=None)
    trained = [size for training, size in sizes if training]
    steps = len(trained) // 3
    assert trained == [8] * 2 * steps + [16] * steps  # two epochs at 8 x 8, the last at full size
    evaluated = [size for training, size in sizes if not training]
    assert evaluated[0] == 8 and set(evaluated[1:]) == {16}  # the up-front check, then validation at full size
    assert len(result.history) == 3
    with pytest.raises(CnnpipeError, match="train.low_res 4: this net takes only its own image size"):
        fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), dataclasses.replace(cfg, arch="cnn3", low_res=4), policy=None)


def test_training_warns_once_when_validation_stays_at_chance(capsys):
    """lr 0: the network never learns; the warning comes after CHANCE_EPOCHS epochs, once, and a learning run has none."""
    from cnnpipe.data.store import few_val_images
    from cnnpipe.engine.loop import CHANCE_EPOCHS, chance_ceiling

    cfg = TrainConfig(arch="cnn3", width=8, epochs=CHANCE_EPOCHS + 1, batch_size=16, lr=0.0)
    torch.manual_seed(0)
    result = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, policy=None)
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("train: validation accuracy has stayed at chance (<= 0.")
    assert f"for {CHANCE_EPOCHS} validations in a row (epochs 1, 2, 3)" in result.warnings[0]
    assert capsys.readouterr().err.count("stayed at chance") == 1
    torch.manual_seed(0)
    learned = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), dataclasses.replace(cfg, lr=0.05, epochs=6), policy=None)
    assert learned.warnings == []
    # 3 balanced classes on 6 images: 1/3 + 2 standard errors; one class of 9 in 10: the majority answer
    assert chance_ceiling(torch.tensor([0, 1, 2] * 2), 3) == pytest.approx(1 / 3 + 2 * (2 / 9 / 6) ** 0.5)
    assert chance_ceiling(torch.tensor([0] * 9 + [1]), 2) == pytest.approx(0.9 + 2 * (0.09 / 10) ** 0.5)
    assert few_val_images(100) is None and "holds 24 images (< 100)" in few_val_images(24)


def test_val_every_validates_every_nth_epoch_and_the_last_and_trains_the_same(tmp_path):
    """train.val_every 2 over 5 epochs validates epochs 2, 4 and 5; 0, the last only. The training is the same run
    (validation draws no randomness), keep best chooses among the validated epochs, and the history file and the
    training curves take the epochs without val metrics."""
    from cnnpipe.engine.model_folder import read_history, write_history
    from cnnpipe.evaluation.figures import training_curves_png

    cfg = TrainConfig(arch="cnn3", width=8, epochs=5, batch_size=16, lr=0.05, ema=0.9)
    runs = {}
    for every in (1, 2, 0):
        torch.manual_seed(0)
        runs[every] = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), dataclasses.replace(cfg, val_every=every),
                          policy=None)
    validated = {every: [e["epoch"] for e in r.history if "val/accuracy" in e] for every, r in runs.items()}
    assert validated == {1: [1, 2, 3, 4, 5], 2: [2, 4, 5], 0: [5]}
    train_only = lambda r: [{k: v for k, v in e.items() if k.startswith("train/") and "per_s" not in k  # noqa: E731
                             and "seconds" not in k} for e in r.history]
    assert train_only(runs[2]) == train_only(runs[1]) == train_only(runs[0])
    every_epoch = {e["epoch"]: e["val/accuracy"] for e in runs[1].history}
    assert runs[2].best_epoch == max([2, 4, 5], key=lambda e: (every_epoch[e], -e))  # the first of equals
    assert runs[0].best_epoch == runs[0].kept_epoch == 5
    for every in (2, 0):  # the same passes on the same weights
        for e in runs[every].history:
            assert {k: v for k, v in e.items() if k.startswith("val/")} == \
                ({k: v for k, v in runs[1].history[e["epoch"] - 1].items() if k.startswith("val/")}
                 if e["epoch"] in validated[every] else {})
    write_history(tmp_path / "history.csv", runs[2].history)
    rows = read_history(tmp_path)
    assert [r["val/accuracy"] != "" for r in rows] == [False, True, False, True, True]
    training_curves_png(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_early_stopping_with_val_every_stops_on_a_validated_epoch():
    """Patience counts epochs, but only a validated epoch can stop the run: it ends on one, which is then its last."""
    cfg = TrainConfig(arch="cnn3", width=8, epochs=40, batch_size=16, lr=0.05, schedule="constant",
                      early_stopping_patience=1, early_stopping_metric="val/loss", val_every=3)
    torch.manual_seed(0)
    result = fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), cfg, policy=None)
    validated = [e["epoch"] for e in result.history if "val/loss" in e]
    assert result.stopped_early and validated == list(range(3, len(result.history) + 1, 3))
    assert result.best_epoch in validated and len(result.history) - result.best_epoch >= 3
    with pytest.raises(CnnpipeError, match="train.val_every 0 validates the last epoch only, so nothing can stop early"):
        fit(build_model("cnn3", 1, 3, 8, 8), tiny_data(), dataclasses.replace(cfg, val_every=0), policy=None)


def test_fit_without_a_val_split_validates_nothing_and_plans_no_validation(capsys):
    """train.train_on_val hands fit an empty val split: no val metrics, no validation pass timed or planned for, the
    last epoch kept, and the run still learns."""
    data = tiny_data()
    empty = dataclasses.replace(data, val_images=data.val_images[:0], val_labels=data.val_labels[:0])
    cfg = TrainConfig(arch="cnn3", width=8, epochs=6, batch_size=16, lr=0.05, keep="last", budget_s=60)
    torch.manual_seed(0)
    result = fit(build_model("cnn3", 1, 3, 8, 8), empty, cfg, policy=None)
    assert [sorted(k for k in e if k.startswith("val/")) for e in result.history] == [[]] * 6
    assert result.best_epoch == 0 and result.kept_epoch == 6 and result.warnings == []
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]
    err = capsys.readouterr().err
    assert "val loss" not in err and "epoch 6/6  train loss" in err
    with pytest.raises(CnnpipeError, match="no val split to keep the best epoch or stop early by"):
        fit(build_model("cnn3", 1, 3, 8, 8), empty, dataclasses.replace(cfg, keep="best"), policy=None)
    # one step, then an update nothing validates: the weights' check stands in for the validation loss's
    one_step = dataclasses.replace(cfg, epochs=1, batch_size=len(data.train_labels), lr=float("inf"),
                                   schedule="constant", budget_s=0.0)
    with pytest.raises(CnnpipeError, match="the weights became non-finite by the end of epoch 1"):
        fit(build_model("cnn3", 1, 3, 8, 8), empty, one_step, policy=None)


def test_train_on_val_is_refused_where_something_must_be_held_out(tmp_path):
    """Keeping the best epoch and early stopping rank by the val split, and streamed shards do not hold it: with
    train_on_val, a one-line error naming the knob before any training (the searches: test_tune.py)."""
    from cnnpipe.stages import augment, train

    write_tiny_dataset(tmp_path / "processed")
    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    for bad, got in (({"keep": "best"}, "expected train.keep last and train.early_stopping_patience 0, got best and 0"),
                     ({"keep": "last", "early_stopping_patience": 2}, "got last and 2"),
                     ({"keep": "last", "data_mode": "stream"}, "not with training batches streamed from shards")):
        with pytest.raises(CnnpipeError, match=f"^train.train_on_val: .*{got}") as e:
            train.run(cfg=TrainConfig(train_on_val=True, **bad), data=tmp_path / "processed",
                      augmented=tmp_path / "augmented", model=tmp_path / "model", tracking=None)
        assert "\n" not in str(e.value) and not (tmp_path / "model").exists()


def test_conv_init_dirac_trains_fastnet_and_is_refused_for_other_nets(tmp_path):
    """train.conv_init dirac: a fastnet run trains and records it; a library backbone, pretrained weights (which
    would overwrite it) or one of cnnpipe's nets without fastnet get one line naming the knob, nothing written."""
    from cnnpipe.stages import augment, train

    write_tiny_dataset(tmp_path / "processed")
    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    for bad in ({"arch": "torchvision/resnet18"}, {"arch": "fastnet", "pretrained": str(tmp_path / "weights.pt")},
                {"arch": "cnn3"}):
        with pytest.raises(CnnpipeError, match=rf"^train.conv_init: dirac initializes fastnet's convolutions .*"
                                               rf"not {bad['arch']}.*: expected default$") as e:
            train.run(cfg=TrainConfig(conv_init="dirac", **bad), data=tmp_path / "processed",
                      augmented=tmp_path / "augmented", model=tmp_path / "model", tracking=None)
        assert "\n" not in str(e.value) and not (tmp_path / "model").exists()
    with pytest.raises(CnnpipeError, match="^train.arch: unknown architecture 'fastnte'"):  # a typo: said as such
        train.run(cfg=TrainConfig(conv_init="dirac", arch="fastnte"), data=tmp_path / "processed",
                  augmented=tmp_path / "augmented", model=tmp_path / "model", tracking=None)
    result = train.run(cfg=TrainConfig(arch="fastnet", conv_init="dirac", epochs=1, width=4),
                       data=tmp_path / "processed", augmented=tmp_path / "augmented", model=tmp_path / "model",
                       tracking=None)
    assert result["epochs"] == 1
    assert json.loads((tmp_path / "model" / CONFIG_FILE).read_text())["train"]["conv_init"] == "dirac"


@pytest.mark.e2e  # a real MLflow store (~10 s to create)
def test_the_train_stage_tags_its_run_with_its_warnings(tmp_path):
    """A network at chance and a 12-image val split: both said in the result and on the MLflow run."""
    import mlflow

    from cnnpipe.config import AugmentConfig, TrackingConfig
    from cnnpipe.stages import augment, train

    write_tiny_dataset(tmp_path / "processed")
    augment.run(cfg=AugmentConfig(), data=tmp_path / "processed", augmented=tmp_path / "augmented")
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="warnings")
    r = train.run(cfg=TrainConfig(epochs=3, width=4, lr=0.0, augment=False), data=tmp_path / "processed",
                  augmented=tmp_path / "augmented", model=tmp_path / "model", tracking=tracking)
    assert len(r["warnings"]) == 2
    assert r["warnings"][0].startswith("train: the validation split holds 12 images (< 100)")
    assert "stayed at chance" in r["warnings"][1]
    tags = mlflow.MlflowClient(tracking.uri).get_run(r["run_id"]).data.tags
    assert tags["cnnpipe.warnings"] == " | ".join(r["warnings"])


def test_ema_of_a_short_run_ships_trained_weights_and_a_long_one_averages():
    """EMA's decay ramps up with the steps: after a few steps the average is the trained weights, not the
    initial ones (a decay of 0.999 alone would keep ~98 % of the initial weights after 20 steps); late in a run
    each step moves it by 1 - decay."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.999)
    initial = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # trained, then 20 steps that change little
    for step in range(1, 21):
        ema.update(model, step)
    assert torch.allclose(ema.model.weight, model.weight, atol=1e-3)
    assert not torch.allclose(ema.model.weight, initial)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 10**6)
    torch.testing.assert_close(ema.model.weight, before + 0.001 * (model.weight - before))


def test_ema_averages_batchnorm_statistics_with_the_weights():
    """The averaged weights are evaluated with averaged BatchNorm statistics, not the last step's: both move
    by 1 - decay a step; the counter is copied."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, 0.9)
    bn, ema_bn = model[1], ema.model[1]
    before = ema_bn.running_mean.clone()
    model.train()
    model(torch.randn(16, 3) * 5 + 3)  # moves the live statistics
    ema.update(model, 10**6)
    torch.testing.assert_close(ema_bn.running_mean, before + 0.1 * (bn.running_mean - before))
    assert not torch.allclose(ema_bn.running_mean, bn.running_mean)
    assert ema_bn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 1


def test_sam_takes_the_gradient_at_the_perturbed_weights_and_puts_everything_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    x, target = torch.randn(8, 4), torch.randn(8, 3)

    def loss():
        return ((model(x) - target) ** 2).sum()

    loss().backward()
    weights = [p.detach().clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    g = [p.grad.clone() for p in model.parameters()]
    rho = 0.1
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    with torch.no_grad():  # the expected gradient: at w + rho * g / |g|, by hand
        for p, t in zip(model.parameters(), g):
            p.add_(t * rho / norm)
    model.zero_grad()
    loss().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
        for b, s in zip(model.buffers(), stats):
            b.copy_(s)
    model.zero_grad()
    loss().backward()
    stats = [b.clone() for b in model.buffers()]  # after the first pass: what SAM's second must leave
    sharpness_aware_gradients(model, rho, loss)
    for p, w, e in zip(model.parameters(), weights, expected):
        assert torch.equal(p.detach(), w) and torch.allclose(p.grad, e, atol=1e-6)
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), stats))
