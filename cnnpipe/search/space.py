"""tune.space: the search space of `cnnpipe tune` (and Katib's experiment), read from params.yaml and checked
against the blocks it tunes: every value (each bound of a range) must make a valid block."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnpipe.config import BLOCKS, DEFAULT_PARAMS, TuneConfig, field_type, load_block
from cnnpipe.errors import CnnpipeError


@dataclass(frozen=True)
class Dimension:
    """One axis of the search space: `train.lr: {log_uniform: [0.01, 1.0]}`."""

    key: str  # block.field in params.yaml
    kind: str  # one of SPACE_KINDS
    values: tuple  # (low, high) for uniform / log_uniform; the options for choice
    integer: bool  # the field is an int: uniform draws integers


SPACE_KINDS = ("uniform", "log_uniform", "choice")
TUNABLE_BLOCKS = ("augment", "train")


def load_tune(params: dict[str, Any], overrides: dict[str, Any],
              params_path: Path = DEFAULT_PARAMS) -> tuple[TuneConfig, dict[str, Dimension]]:
    """The tune block's settings and its validated search space (`tune.space`)."""
    cfg = load_block(TuneConfig, "tune", params, overrides, params_path)
    space = {str(key): _dimension(str(key), entry, params, params_path) for key, entry in cfg.space.items()}
    return cfg, space


def check_val_held_out(params: dict[str, Any], space: dict[str, Dimension], metric: str) -> None:
    """A search ranks trials by the val split's `metric`: a CnnpipeError when train.train_on_val would train on it."""
    if (params.get("train") or {}).get("train_on_val") or "train.train_on_val" in space:
        raise CnnpipeError(f"train.train_on_val: a search ranks trials by the val split's {metric}, which the trials "
                           f"would train on: expected false while searching (set it for the final fit)")


def _dimension(key: str, entry: Any, params: dict[str, Any], params_path: Path) -> Dimension:
    where = f"params file '{params_path}': tune.space.{key}"
    block, _, name = key.partition(".")
    if block not in TUNABLE_BLOCKS:
        raise CnnpipeError(f"{where}: expected a key augment.FIELD or train.FIELD")
    cls = BLOCKS[block]
    fields = {f.name for f in dataclasses.fields(cls)}
    if name not in fields:
        raise CnnpipeError(f"{where}: {name!r} is not a field of {block} (expected one of: {', '.join(fields)})")
    if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in SPACE_KINDS:
        raise CnnpipeError(f"{where}: expected one of {{uniform: [low, high]}}, {{log_uniform: [low, high]}}, "
                           f"{{choice: [v1, v2, ...]}}, got {entry!r}")
    kind, values = next(iter(entry.items()))
    kind_of_field, _ = field_type(cls, name)
    if not isinstance(values, list) or not values:
        raise CnnpipeError(f"{where}: {kind} expects a non-empty list, got {values!r}")
    if kind != "choice":
        if kind_of_field not in (int, float):
            raise CnnpipeError(f"{where}: {kind} needs a numeric field; {block}.{name} is a {kind_of_field.__name__} "
                               f"(use choice)")
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
                or not values[0] < values[1]:
            raise CnnpipeError(f"{where}: {kind} expects [low, high] with low < high, got {values!r}")
        if kind == "log_uniform" and values[0] <= 0:
            raise CnnpipeError(f"{where}: log_uniform expects low > 0, got {values[0]!r}")
    checked = []
    for v in values:  # every value (each bound of a range) must make a valid block, named as tune.space's key
        base = {k: v2 for k, v2 in (params.get(block) or {}).items() if k != name} if isinstance(params.get(block), dict) else {}
        try:
            cfg = load_block(cls, block, {block: {**base, name: v}}, {}, params_path)
        except CnnpipeError as e:
            raise CnnpipeError(f"{where}: value {v!r}: {str(e).split(': ', 1)[-1]}") from None
        checked.append(getattr(cfg, name))
    return Dimension(key, kind, tuple(checked), kind_of_field is int)
