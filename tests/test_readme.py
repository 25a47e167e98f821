"""README.md's figures come from the benchmark results: it is exactly what scripts/readme.py renders."""

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
    assert (REPO / "README.md").read_text() == readme.render(readme.TEMPLATE.read_text()), \
        "README.md is stale: edit docs/README.in.md and run `python scripts/readme.py`"


def test_placeholders_name_what_is_missing():
    readme = load_readme_script()
    assert readme.render("{{ ingest_gtsrb.images_per_s | int }} img/s").endswith("img/s")
    with pytest.raises(KeyError, match="no results file"):
        readme.render("{{ nothing_here.x }}")
    with pytest.raises(KeyError, match="has no 'nope'"):
        readme.render("{{ ingest_gtsrb.nope }}")
    with pytest.raises(KeyError, match="unknown format"):
        readme.render("{{ ingest_gtsrb.wall_s | furlongs }}")
