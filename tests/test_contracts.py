"""The stage contracts in cnnpipe/stages/spec.py against everything that calls the stages: dvc.yaml (deps
cover the code each stage runs, params name what changes its result), MLproject, the CLI, the KFP components."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml

from cnnpipe.cli import build_parser
from cnnpipe.config import result_keys
from cnnpipe.stages.spec import STAGES
from tests.helpers import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


def _module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imported(file: Path, module: str) -> set[str]:
    """Every cnnpipe module `file` imports, at the top or inside a function (lazy imports run too)."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return {n for n in names if n.split(".")[0] == "cnnpipe" and _module_file(n)}


def project_files(module: str) -> set[Path]:
    """The files of every cnnpipe module running `module` executes: its imports, theirs, and the packages'
    __init__ files on the way."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += sorted(_imported(_module_file(name), name))
    return {_module_file(name).relative_to(REPO) for name in seen}


def covered(file: Path, deps: list[str]) -> bool:
    return any(file == Path(d) or Path(d) in file.parents for d in deps)


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_deps_cover_every_module_the_stage_runs(name):
    deps = DVC[name]["deps"]
    missing = sorted(str(f) for f in project_files(STAGES[name].module) if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {name!r} runs these files but does not depend on them: {missing}"


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_params_are_the_keys_that_change_the_result(name):
    assert sorted(DVC[name]["params"]) == sorted(result_keys(name))
    assert f"{name}.device" not in DVC[name]["params"]


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_cmd_paths_and_outs_follow_the_spec(name):
    stage, cmd = STAGES[name], DVC[name]["cmd"]
    assert cmd.startswith(f"cnnpipe {name} ")
    for port in stage.ports:
        assert re.search(rf"{port.flag} {re.escape(port.path)}(\s|$)", cmd), f"{name}: {port.flag} {port.path}"
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in DVC[name]["outs"]]
    assert outs == [p.path for p in stage.outputs]
    assert {p.path for p in stage.inputs} <= set(DVC[name]["deps"])


@pytest.mark.parametrize("name", list(STAGES))
def test_mlproject_entry_point_passes_params_overrides_and_every_path(name):
    entry = MLPROJECT[name]
    assert set(entry["parameters"]) == {"params", "overrides", "workdir"}  # no param default of its own
    assert entry["command"].split()[:6] == ["cnnpipe", name, "--params", "{params}", "--set", "{overrides}"]
    for port in STAGES[name].ports:
        assert f"{port.flag} {{workdir}}/" in entry["command"]
    assert f"cnnpipe {name} --params {{params}} --set {{overrides}}" in MLPROJECT["main"]["command"]


@pytest.mark.parametrize("name", list(STAGES))
def test_cli_has_a_flag_per_port_and_param(name):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[name]
    flags = {o: a.dest for a in sub._actions for o in a.option_strings}
    for port in STAGES[name].ports:
        assert flags[port.flag] == port.name
    assert {"--params", "--set"} <= set(flags)


@pytest.mark.parametrize("name", list(STAGES))
def test_kfp_component_artifacts_are_the_stage_ports(name):
    from components import stages as components

    signature = inspect.signature(getattr(components, name).python_func)
    artifacts = {k for k, p in signature.parameters.items() if "Input" in str(p.annotation) or "Output" in str(p.annotation)}
    kfp_views = {"metrics", "classification", "report"} if name == "evaluate" else set()
    assert artifacts - kfp_views == {p.name for p in STAGES[name].ports}
    assert {"params", "overrides"} <= set(signature.parameters)


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """A core-only install (a serving image) running a command that needs an extra: which one to install."""
    from cnnpipe.cli import main

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    assert main(["ingest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cnnpipe ingest: error: this command needs matplotlib, which is not installed: "
                   "pip install 'cnnpipe[train]'"]
    assert not (tmp_path / "data/processed").exists()


@pytest.mark.e2e
def test_committed_dvc_lock_matches_the_code_and_params():
    """dvc.lock was written by a `dvc repro` of this very code and params.yaml: a fresh clone's `dvc repro`
    re-runs nothing because of a stale lock (outputs it lacks are rebuilt, the same bytes but the registration
    record, or fetched with `dvc pull`)."""
    import json
    import subprocess

    proc = subprocess.run(["dvc", "status", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stale = []
    for stage, changes in json.loads(proc.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):
                continue
            for dep, state in (change.get("changed deps") or {}).items():
                # an upstream stage's output missing in a fresh clone ("deleted" data) is expected; code or
                # params that differ from the lock are not
                if isinstance(state, dict) or not (state == "deleted" and dep.startswith("data/")):
                    stale.append((stage, dep, state))
    assert not stale, f"dvc.lock is stale: run `dvc repro` and commit dvc.lock ({stale[:5]})"
