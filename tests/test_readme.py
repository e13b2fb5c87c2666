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
