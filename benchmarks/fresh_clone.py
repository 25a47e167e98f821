"""A fresh clone as a newcomer and CI meet it, each step timed in a clone of this repository's HEAD:
README's setup command, `dvc repro` twice, the unit tier; or (--ci) the whole of .ci/run as CI runs it.

    python -m benchmarks.fresh_clone            # setup, dvc repro x2, unit tier
    python -m benchmarks.fresh_clone --ci       # .ci/run (its figures are added to the same results file)

Results: benchmarks/results/fresh_clone.json (quoted in README through scripts/readme.py). The pip cache
is whatever this machine has (the cold download of torch's CUDA build, ~5.5 GB, is not part of it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from benchmarks.harness import load_average, record, run

REPO = Path(__file__).resolve().parent.parent
README_TEST = "tests/test_readme.py::test_readme_is_rendered_from_the_template_and_the_results"


def timed(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> tuple[float, str, int]:
    measured = run(cmd, cwd=cwd, env=env, check=check)
    return round(measured.wall_s, 1), measured.stdout + measured.stderr, measured.returncode


def head(clone: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()


def pytest_summary(output: str) -> str:
    lines = [line.strip("= ") for line in output.splitlines() if re.search(r"\d+ passed", line)]
    return lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ci", action="store_true", help="run .ci/run in the clone instead (~20 min)")
    parser.add_argument("--keep", type=Path, help="clone here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clone = args.keep or Path(tmp) / "cnnpipe"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
        env["PATH"] = f"{clone / '.venv/bin'}{os.pathsep}{env['PATH']}"
        results = REPO / "benchmarks/results/fresh_clone.json"
        if args.ci:  # added to the figures of the other steps
            result = {k: v for k, v in json.loads(results.read_text()).items() if k not in ("machine", "date")}
            result["ci_s"], out, code = timed(["bash", ".ci/run"], clone, {**env, "CI": "true"}, check=False)
            result |= {"ci": pytest_summary(out), "ci_exit_code": code, "ci_commit": head(clone),
                       "ci_load_average_after": load_average()}
            record(results, result)
            return
        result: dict = {"what": "a fresh clone of HEAD: README's commands, then the unit tier", "commit": head(clone)}
        result["setup_s"], _, _ = timed(["bash", "scripts/setup.sh"], clone, env)
        result["dvc_repro_s"], _, _ = timed(["dvc", "repro"], clone, env)
        result["dvc_repro_again_s"], again, _ = timed(["dvc", "repro"], clone, env)
        result["dvc_repro_again_up_to_date"] = "up to date" in again
        metrics = json.loads((clone / "data/evaluation/metrics.json").read_text())
        result["test_accuracy"], result["val_accuracy"] = metrics["test"]["accuracy"], metrics["val"]["accuracy"]
        result["test_images"] = json.loads((clone / "data/processed/manifest.json").read_text())["counts"]["test"]["total"]
        status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
        # what `dvc repro` left changed or untracked in the clone: a newcomer's `git status`
        result["git_status_after_repro"] = status.splitlines()
        # the README check is left out: README's figures come from this very run
        result["unit_tier_s"], out, code = timed([".venv/bin/python", "-m", "pytest", "-q", "-m", "not e2e", "-p",
                                                  "no:cacheprovider", "--deselect", README_TEST], clone, env, check=False)
        result |= {"unit_tier": pytest_summary(out), "unit_tier_exit_code": code, "load_average_after": load_average()}
    record(results, result)


if __name__ == "__main__":
    main()
