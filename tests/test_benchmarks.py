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
