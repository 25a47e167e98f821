"""README.md is rendered from docs/README.in.md: every measured figure in it is a placeholder filled from
the benchmark results (benchmarks/results/<name>.json), so a figure cannot drift from its evidence.

    {{ train_gtsrb.val_accuracy | pct }}       -> 99.34 %
    {{ ingest_gtsrb.images_per_s | int }}      -> 5,430
    {{ train_gtsrb.machine.cpu }}              -> the value as it is
    {{ table study_gtsrb.md }}                 -> the Markdown table in that results file

A path is dotted keys (and list indexes) into the JSON file named by its first part.

    python scripts/readme.py            # rewrite README.md
    python scripts/readme.py --check    # exit 1 when README.md is not what the template and results make
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "docs" / "README.in.md"
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
PLACEHOLDER = re.compile(r"\{\{\s*([\w.-]+)\s*(?:\|\s*(\w+)\s*)?\}\}")
TABLE = re.compile(r"\{\{\s*table\s+([\w.-]+\.md)\s*\}\}")
HEADER = "<!-- Generated from docs/README.in.md by scripts/readme.py: edit the template, then run the script. -->\n"

FORMATS = {
    "pct": lambda v: f"{100 * v:.2f} %",  # a fraction as a percentage
    "pct1": lambda v: f"{100 * v:.1f} %",
    "int": lambda v: f"{round(v):,}",
    "f0": lambda v: f"{v:,.0f}",
    "f1": lambda v: f"{v:,.1f}",
    "f2": lambda v: f"{v:,.2f}",
    "f3": lambda v: f"{v:.3f}",
    "x": lambda v: f"{v:.1f}×",  # a ratio
    "gb": lambda v: f"{v / 1000:.1f} GB",  # from MB
    "min": lambda v: f"{int(v // 60)} min {round(v % 60)} s",  # from seconds
}


def lookup(path: str, cache: dict[str, Any]) -> Any:
    name, *keys = path.split(".")
    if name not in cache:
        file = RESULTS / f"{name}.json"
        if not file.exists():
            raise KeyError(f"{{{{ {path} }}}}: no results file {file.relative_to(ROOT)}")
        cache[name] = json.loads(file.read_text())
    value = cache[name]
    for key in keys:
        try:
            value = value[int(key)] if isinstance(value, list) else value[key]
        except (KeyError, IndexError, ValueError):
            raise KeyError(f"{{{{ {path} }}}}: {name}.json has no {key!r} there") from None
    return value


def render(template: str) -> str:
    cache: dict[str, Any] = {}

    def fill(m: re.Match) -> str:
        value = lookup(m.group(1), cache)
        fmt = m.group(2)
        if fmt is None:
            return str(value)
        if fmt not in FORMATS:
            raise KeyError(f"{m.group(0)}: unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")
        return FORMATS[fmt](value)

    def table(m: re.Match) -> str:
        file = RESULTS / m.group(1)
        if not file.exists():
            raise KeyError(f"{m.group(0)}: no results file {file.relative_to(ROOT)}")
        return "\n".join(line for line in file.read_text().splitlines() if line.startswith("|"))

    return HEADER + PLACEHOLDER.sub(fill, TABLE.sub(table, template))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args()
    try:
        text = render(TEMPLATE.read_text())
    except KeyError as e:
        print(f"readme: error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.check:
        if README.read_text() != text:
            print("readme: README.md differs from docs/README.in.md + benchmarks/results: run "
                  "`python scripts/readme.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(text)
    print(json.dumps({"written": str(README.relative_to(ROOT))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
