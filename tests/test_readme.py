"""README.md and the docs pages carry figures from the benchmark results: each is exactly what scripts/readme.py
renders from its template in docs/templates/."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import REPO


def load_readme_script():  # noqa: ANN201 - the module
    spec = importlib.util.spec_from_file_location("readme", REPO / "scripts/readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_rendered_from_the_template_and_the_results():
    readme = load_readme_script()
    files = readme.rendered_files()
    assert {REPO / "README.md", REPO / "docs/index.md"} <= files.keys()
    stale = [str(path.relative_to(REPO)) for path, text in files.items() if not path.exists() or path.read_text() != text]
    assert not stale, f"{stale} stale: edit docs/templates/ and run `python scripts/readme.py`"
    assert not readme.orphans(files), "a generated page has lost its template: run `python scripts/readme.py`"


def test_the_site_home_is_the_readme_with_links_inside_docs():
    readme = load_readme_script()
    files = readme.rendered_files()
    assert "](docs/" in files[REPO / "README.md"]
    assert "](docs/" not in files[REPO / "docs/index.md"]
    assert files[REPO / "docs/index.md"] == files[REPO / "README.md"].replace("](docs/", "](")


def test_placeholders_name_what_is_missing():
    readme = load_readme_script()
    assert readme.render("{{ ingest_gtsrb.images_per_s | int }} img/s").endswith("img/s")
    with pytest.raises(KeyError, match="no results file"):
        readme.render("{{ nothing_here.x }}")
    with pytest.raises(KeyError, match="has no 'nope'"):
        readme.render("{{ ingest_gtsrb.nope }}")
    with pytest.raises(KeyError, match="unknown format"):
        readme.render("{{ ingest_gtsrb.wall_s | furlongs }}")
    with pytest.raises(KeyError, match="no results file"):
        readme.render("{{ table nothing_here.md }}")
    with pytest.raises(KeyError, match="not a placeholder"):
        readme.render("{{ ingest_gtsrb.wall_s | }}")


def test_keys_with_dots_are_found(tmp_path, monkeypatch):
    readme = load_readme_script()
    (tmp_path / "screens.json").write_text('{"points": {"60_lr-0.3": {"runs": [{"acc": 0.5}]}, "60_lr-0": {"acc": 0.1}}}')
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    assert readme.render("{{ screens.points.60_lr-0.3.runs.0.acc | pct }}") == "50.00 %"
    assert readme.render("{{ screens.points.60_lr-0.acc }}") == "0.1"
    with pytest.raises(KeyError, match="has no 'nope'"):
        readme.render("{{ screens.points.nope.3.acc }}")
    with pytest.raises(KeyError, match="has no 'missing'"):  # the deepest part not found is named
        readme.render("{{ screens.points.60_lr-0.3.runs.0.missing }}")
    with pytest.raises(KeyError, match="has no 'runs'"):
        readme.render("{{ screens.points.60_lr-0.runs }}")


def test_a_generated_page_without_its_template_is_found(tmp_path, monkeypatch):
    readme = load_readme_script()
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates/kept.md").write_text("# kept\n")
    (tmp_path / "gone.md").write_text(readme.HEADER.format("docs/templates/gone.md") + "# gone\n")
    (tmp_path / "by-hand.md").write_text("# written by hand\n")
    monkeypatch.setattr(readme, "DOCS", tmp_path)
    monkeypatch.setattr(readme, "TEMPLATES", tmp_path / "templates")
    files = {tmp_path / "kept.md": "x"}
    assert readme.orphans(files) == [tmp_path / "gone.md"]
