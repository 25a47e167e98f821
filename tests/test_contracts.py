"""The stage contracts in cnnpipe/stages/spec.py against everything that calls the stages: dvc.yaml (deps
cover the code each stage runs, params name what changes its result), MLproject, the CLI, the KFP components."""

from __future__ import annotations

import ast
import inspect
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from cnnpipe.cli import build_parser
from cnnpipe.config import result_keys
from cnnpipe.stages.spec import STAGES
from tests.helpers import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIRS = PYPROJECT["package-dir"]  # cnnpipe.components -> components/, cnnpipe.pipeline -> pipeline/


def _module_file(name: str) -> Path | None:
    for package, folder in PACKAGE_DIRS.items():
        if name == package or name.startswith(package + "."):
            name = folder + name[len(package):]
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _module_name(file: Path) -> str:
    rel = file.relative_to(REPO).with_suffix("")
    name = ".".join(rel.parts).removesuffix(".__init__")
    for package, folder in PACKAGE_DIRS.items():
        if name == folder or name.startswith(folder + "."):
            name = package + name[len(folder):]
    return name


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
    from cnnpipe.components import stages as components

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


def _import_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports, at the top or lazily (both run); not its own
    parent packages, which Python has begun to run before it (`from pkg import sibling` inside pkg)."""
    files = [f for folder in ("cnnpipe", *PACKAGE_DIRS.values()) for f in (REPO / folder).rglob("*.py")]
    modules = {_module_name(f): f for f in files}
    return {m: {n for n in _imported(f, m) if n in modules and n != m and not m.startswith(n + ".")}
            for m, f in modules.items()}


def test_every_package_folder_is_installed():
    """pyproject lists the packages (the KFP folders install under cnnpipe): a new folder missing there would be
    absent from a wheel, and nothing but cnnpipe goes to site-packages."""
    folders = {_module_name(f.parent) for folder in ("cnnpipe", *PACKAGE_DIRS.values())
               for f in (REPO / folder).rglob("__init__.py")}
    assert folders == set(PYPROJECT["packages"])
    assert {p.split(".")[0] for p in PYPROJECT["packages"]} == {"cnnpipe"}


def test_no_import_cycles():
    """No module reaches itself through the project's imports, lazy ones included (Tarjan's SCCs)."""
    graph, index, low, stack, cycles = _import_graph(), {}, {}, [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


LOWER = ("cnnpipe.data", "cnnpipe.engine", "cnnpipe.models", "cnnpipe.augment", "cnnpipe.imaging", "cnnpipe.calibration")


def test_layering_data_and_engine_never_import_serving_or_stages():
    graph = _import_graph()
    wrong = {m: sorted(n for n in deps if n.startswith(("cnnpipe.serving", "cnnpipe.stages")))
             for m, deps in graph.items() if m.startswith(LOWER)}
    assert not {m: d for m, d in wrong.items() if d}


@pytest.mark.parametrize("name", ["ingest", "augment", "train", "evaluate"])
def test_no_pipeline_stage_runs_http_code(name):
    """Editing the server or the request parser re-runs no stage but register (which logs the pyfunc model)."""
    assert not [f for f in project_files(STAGES[name].module) if f.parts[:2] == ("cnnpipe", "serving")]


def test_serving_preprocessing_and_calibration_import_no_torch():
    """The lean serving path's shared modules: numpy and Pillow only (SageMaker's archive copies them too)."""
    for module in ("cnnpipe.imaging", "cnnpipe.calibration", "cnnpipe.errors", "cnnpipe.fsio"):
        tree = ast.parse(_module_file(module).read_text())
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        top |= {(node.module or "").split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert "torch" not in top, module


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
