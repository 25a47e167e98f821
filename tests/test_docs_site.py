"""The docs site: every page of docs/ is in mkdocs.yml's nav, and `mkdocs build --strict` passes (a broken
link or anchor, or a page left out of the nav, fails it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO


def nav_pages(nav: list) -> list[str]:  # noqa: ANN001
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_nav_lists_every_page_and_only_pages_that_exist():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    assert pages[0] == "index.md"
    assert len(pages) == len(set(pages)), "a page is twice in the nav"
    on_disk = {p.name for p in (REPO / "docs").glob("*.md")}
    assert set(pages) == on_disk, f"in the nav only: {set(pages) - on_disk}; on disk only: {on_disk - set(pages)}"


def test_readme_links_into_pages_that_exist():
    links = re.findall(r"\]\(docs/([^)#]+)", (REPO / "README.md").read_text())
    assert links, "README links to no docs page"
    assert [link for link in links if not (REPO / "docs" / link).exists()] == []


@pytest.mark.e2e
def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about its successor
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for page in ("index.html", "results/index.html", "datasets/index.html", "search/search_index.json"):
        assert (tmp_path / "site" / page).exists(), page
    home = (tmp_path / "site/index.html").read_text()
    assert "dvc repro" in home and "{{" not in home
