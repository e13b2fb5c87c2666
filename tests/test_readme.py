"""The README's recipes are valid recipes (they are the documentation of every method)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from merge_ops.params import CATALOG
from merge_ops.recipe import load_recipe

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_readme_recipe_validates_and_every_method_has_one() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)
    recipes = [d for b in blocks for d in yaml.safe_load_all(b) if isinstance(d, dict) and "method" in d]
    methods = {load_recipe(recipe).method for recipe in recipes}
    assert methods == set(CATALOG)


def test_the_architecture_table_names_files_and_entry_points_that_exist() -> None:
    """Every hop of README's architecture table is a file of the repository defining the entry point named."""
    text = README.read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 15
    root = README.parent
    for row in rows:
        _, files, names = (cell.strip() for cell in row.strip("|").split("|"))
        paths = re.findall(r"`([^`]+)`", files)
        entries = re.findall(r"`([^`]+)`", names)
        assert len(paths) == len(entries), row
        for path, name in zip(paths, entries, strict=True):
            source = (root / path).read_text()
            assert re.search(rf"^(async )?(def|class) {name}\b", source, re.MULTILINE), (path, name)
