"""promote / rollback: move the `champion` alias only when the challenger is measurably better.

Both models are scored on the same test split, each through its registered pyfunc (the very model a
server would load), on the registry's metric and protocol (served: the whole images, as a server
receives them; roi: each cropped to its box, as a request with a box); the decision and both figures
are recorded as tags of the challenger's version. The versions that held `champion` are kept in a registered-model tag, so
`rollback` can bring the previous one back.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cnnpipe.config import RegisterConfig, TrackingConfig
from cnnpipe.data.store import Dataset, read_dataset
from cnnpipe.errors import CnnpipeError
from cnnpipe.imaging import as_requests
from cnnpipe.tracking import CHALLENGER, CHAMPION, Registry


def protocol_requests(ds: Dataset, protocol: str) -> list:
    """The test split as requests of `protocol`; one stderr line when the dataset cannot show it."""
    test = ds.splits["test"]
    whole = ds.manifest.get("whole_frames", True)
    if protocol == "roi" and not ds.has_boxes:
        if whole:
            raise CnnpipeError("register.promotion_protocol: roi needs a dataset with boxes (gtsrb with "
                               "ingest.roi_crop: false); this one has none")
        return as_requests(test.images)  # fixed ROI crops already
    if protocol == "served" and not whole:
        print("promote: the dataset holds ROI crops (ingest.roi_crop: true), not the whole frames a server gets: "
              "scored on the crops", file=sys.stderr)
    return as_requests(test.images, test.boxes if protocol == "roi" else None)


def score(registry: Registry, model_uri: str, ds: Dataset, metric: str, protocol: str = "served") -> float:
    """`metric` of a registered model on the dataset's test split, through its own preprocessing."""
    import torch  # here, not at the top: `rollback` scores nothing and starts without torch and scikit-learn

    from cnnpipe.engine.inference import predict_logits, to_nchw_uint8
    from cnnpipe.evaluation.metrics import classification_metrics
    from cnnpipe.serving import trusted

    predictor, _ = trusted.load(registry, model_uri)
    if predictor.spec.classes != ds.classes:
        raise CnnpipeError(f"{model_uri} predicts {predictor.spec.num_classes} classes, the test split has "
                           f"{len(ds.classes)} other ones: the two cannot be compared on it (use --force)")
    batch = predictor.preprocess(protocol_requests(ds, protocol))
    logits = predict_logits(predictor.model, to_nchw_uint8(batch, predictor.device), predictor.mean, predictor.std)
    labels = torch.from_numpy(ds.splits["test"].labels).to(predictor.device)
    return classification_metrics(logits, labels, ds.classes, predictor.calibration.temperature)["scalars"][metric]


def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def promote(cfg: RegisterConfig, tracking: TrackingConfig, name: str, ref: str, data: Path, force: bool = False) -> dict:
    """Decide and move `champion` while holding the registry's update lock: concurrent promotions queue up,
    and each one's history read is the one it extends."""
    registry = Registry(tracking.uri)
    ds = read_dataset(data, splits=("test",))
    challenger = str(registry.version(name, ref).version)
    # scored before the lock, on its version alone: concurrent promotions queue only for the champion's score,
    # the decision and the alias move
    challenger_value = score(registry, f"models:/{name}/{challenger}", ds, cfg.promotion_metric,
                             cfg.promotion_protocol)
    with registry.update_lock():
        return _promote(cfg, registry, name, challenger, challenger_value, ds, force)


def _promote(cfg: RegisterConfig, registry: Registry, name: str, challenger: str, challenger_value: float,
             ds: Dataset, force: bool) -> dict:
    champion = registry.alias_version(name, CHAMPION)
    read = registry.champion_history(name)
    history = read or ([champion] if champion else [])
    metric, lower_better = cfg.promotion_metric, cfg.promotion_metric == "loss"
    protocol = cfg.promotion_protocol
    champion_value = None
    if champion == challenger:
        decision = "already champion"
    elif champion is None:
        decision = "promoted: first model"
    else:
        champion_value = score(registry, f"models:/{name}/{champion}", ds, metric, protocol) if not force else None
        gain = None if champion_value is None else (
            champion_value - challenger_value if lower_better else challenger_value - champion_value)
        if force:
            decision = "promoted: forced"
        elif gain > 0 and gain >= cfg.min_delta:
            decision = f"promoted: better by {gain:.4f} >= min_delta {cfg.min_delta}"
        else:
            decision = f"kept champion: challenger {'worse' if gain < 0 else 'not better'} by {abs(gain):.4f} " \
                       f"(needs a gain >= {cfg.min_delta})"
    promoted = decision.startswith("promoted")
    if promoted:
        registry.set_champion(name, challenger, [*history, challenger], read)
    registry.tag_version(name, challenger, {
        "promotion.decision": decision, "promotion.metric": f"test/{metric}", "promotion.protocol": protocol,
        "promotion.challenger_value": round(challenger_value, 6),
        "promotion.champion_version": champion or "none",
        "promotion.champion_value": "n/a" if champion_value is None else round(champion_value, 6),
    })
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(_table([("", "version", f"test/{metric} ({protocol})"), (CHALLENGER, challenger, fmt(challenger_value)),
                  (CHAMPION, champion or "-", fmt(champion_value))]) + f"\n{decision}", file=sys.stderr)
    return {"name": name, "challenger": challenger, "champion_before": champion,
            "champion": challenger if promoted else champion, "promoted": promoted, "decision": decision,
            "metric": f"test/{metric}", "protocol": protocol, "challenger_value": challenger_value,
            "champion_value": champion_value}


def rollback(tracking: TrackingConfig, name: str) -> dict:
    registry = Registry(tracking.uri)
    with registry.update_lock():
        return _rollback(registry, name)


def _rollback(registry: Registry, name: str) -> dict:
    history = registry.champion_history(name)
    current = registry.alias_version(name, CHAMPION)
    if len(history) < 2 or current is None:
        raise CnnpipeError(f"model {name!r} has no previous champion to roll back to (champion history: {history})")
    previous = history[-2]
    registry.set_champion(name, previous, history[:-1], history)
    registry.tag_version(name, current, {"promotion.decision": f"rolled back to version {previous}"})
    print(f"{name}: champion {current} -> {previous} (rolled back)", file=sys.stderr)
    return {"name": name, "champion": previous, "rolled_back": current}
