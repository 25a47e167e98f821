"""House rules that hold across the code: measured figures live in benchmarks/results, not in cnnpipe/."""

from __future__ import annotations

import re

from tests.helpers import REPO

# A measured figure: "~400 MB", "1.6x faster", "3,700 img/s", "11 ms with one thread" ... in a comment,
# a docstring or --help text goes stale the day the code or the machine changes; results files do not.
FIGURE = re.compile(r"~\s?[\d,.]+\s?(MB|GB|MiB|GiB|ms|s|img/s|x)\b|\b[\d.]+x (faster|slower|sooner)\b"
                    r"|\b\d[\d,.]* ?(img/s|images/s)\b|\b\d+ ms (with|per|for)\b|measured[^\n\"]{0,40}\d")


def test_no_measured_figures_in_the_code():
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in sorted((REPO / "cnnpipe").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if FIGURE.search(line)]
    assert not found, "measured figures belong in benchmarks/results/*.json:\n" + "\n".join(found)


def test_the_figure_pattern_finds_figures():
    for text in ("# torch costs ~650 MB of RSS", '"measured 1.4-1.8x faster on CPU"', "w=16 trains at ~3,700 img/s",
                 "one 32x32 image in 11 ms with one thread", "a flat ~40 ms per request"):
        assert FIGURE.search(text), text
    for text in ("images per np.bincount call", "max_member_mb: float", "32x32 RGB", "f'{ips:.0f} img/s'"):
        assert not FIGURE.search(text), text
