"""Render README.md and the docs site's pages from docs/templates/, every figure from benchmarks/results.

Every measured figure in a template is a placeholder filled from the benchmark results
(benchmarks/results/<name>.json), so a figure cannot drift from its evidence.

    docs/templates/README.md  -> README.md, and docs/index.md (the site's home: its docs/ links made relative)
    docs/templates/<page>.md  -> docs/<page>.md

    {{ train_gtsrb.val_accuracy | pct }}       -> 99.34 %
    {{ ingest_gtsrb.images_per_s | int }}      -> 5,430
    {{ train_gtsrb.machine.cpu }}              -> the value as it is
    {{ table study_gtsrb.md }}                 -> the Markdown table in that results file

A path is dotted keys (and list indexes) into the JSON file named by its first part; a key may hold dots
itself (a benchmark variant labelled lr-0.3): the longest run of parts that is a key and leads on to the rest of
the path is taken. A page of docs/ with no template is written by hand and left alone.

    python scripts/readme.py            # rewrite README.md and the rendered pages
    python scripts/readme.py --check    # exit 1 when one of them is not what its template and the results make
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TEMPLATES = DOCS / "templates"
README = ROOT / "README.md"
SITE_HOME = DOCS / "index.md"
RESULTS = ROOT / "benchmarks" / "results"
PLACEHOLDER = re.compile(r"\{\{\s*([\w.-]+)\s*(?:\|\s*(\w+)\s*)?\}\}")
TABLE = re.compile(r"\{\{\s*table\s+([\w.-]+\.md)\s*\}\}")
HEADER = "<!-- Generated from {} by scripts/readme.py: edit the template, then run the script. -->\n"
# README links into the site as docs/<page>.md; the site's home, inside docs/, as <page>.md
DOCS_LINK = re.compile(r"\]\(docs/")

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
    "lines": lambda v: ", ".join(f"`{line.strip()}`" for line in v) or "none",  # a list of lines, as code
}


def lookup(path: str, cache: dict[str, Any]) -> Any:
    name, *keys = path.split(".")
    if name not in cache:
        file = RESULTS / f"{name}.json"
        if not file.exists():
            raise KeyError(f"{{{{ {path} }}}}: no results file {file.relative_to(ROOT)}")
        cache[name] = json.loads(file.read_text())
    found = resolve(cache[name], keys)
    if isinstance(found, Missing):
        raise KeyError(f"{{{{ {path} }}}}: {name}.json has no {found.key!r} there")
    return found


class Missing:
    """The part of a path that was not found (the deepest a resolution got)."""

    def __init__(self, key: str, depth: int) -> None:
        self.key, self.depth = key, depth


def resolve(value: Any, parts: list[str], depth: int = 0) -> Any:
    """`value` at the dotted `parts`, or the Missing part: dict keys may hold dots, so the longest run of parts that
    is a key and resolves the rest wins."""
    if not parts:
        return value
    deepest = Missing(parts[0], depth)
    if isinstance(value, list):
        try:
            return resolve(value[int(parts[0])], parts[1:], depth + 1)
        except (IndexError, ValueError):
            return deepest
    if not isinstance(value, dict):
        return deepest
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in value:
            found = resolve(value[key], parts[n:], depth + n)
            if not isinstance(found, Missing):
                return found
            deepest = max(deepest, found, key=lambda m: m.depth)
    return deepest


def render(template: str) -> str:
    """The template with every placeholder filled from the results files."""
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

    text = PLACEHOLDER.sub(fill, TABLE.sub(table, template))
    leftover = re.search(r"\{\{.*?\}\}", text)
    if leftover:
        raise KeyError(f"{leftover.group(0)}: not a placeholder (expected a results path with an optional "
                       "| format, or table <file>.md)")
    return text


def rendered_files() -> dict[Path, str]:
    """Every file the templates make, with the text it must hold."""
    files: dict[Path, str] = {}
    for template in sorted(TEMPLATES.glob("*.md")):
        header = HEADER.format(template.relative_to(ROOT).as_posix())
        try:
            text = render(template.read_text())
        except KeyError as e:
            raise KeyError(f"{template.relative_to(ROOT)}: {e.args[0]}") from None
        if template.name == README.name:
            files[README] = header + text
            files[SITE_HOME] = header + DOCS_LINK.sub("](", text)
        else:
            files[DOCS / template.name] = header + text
    return files


def orphans(files: dict[Path, str]) -> list[Path]:
    """Pages of docs/ that say they are generated but whose template is gone."""
    return [page for page in sorted(DOCS.glob("*.md"))
            if page not in files and page.read_text().startswith(HEADER.split("{}")[0])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the rendered files are up to date")
    args = parser.parse_args()
    try:
        files = rendered_files()
    except KeyError as e:
        print(f"readme: error: {e.args[0]}", file=sys.stderr)
        return 2
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    if args.check:
        problems = [f"{path.relative_to(ROOT)} differs from its template + benchmarks/results" for path in stale]
        problems += [f"{page.relative_to(ROOT)} has no template in docs/templates/ any more" for page in orphans(files)]
        for problem in problems:
            print(f"readme: {problem}: run `python scripts/readme.py`", file=sys.stderr)
        return 1 if problems else 0
    for path in stale:
        path.write_text(files[path])
    removed = orphans(files)
    for page in removed:
        page.unlink()
    print(json.dumps({"written": [str(path.relative_to(ROOT)) for path in stale],
                      "removed": [str(page.relative_to(ROOT)) for page in removed]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
