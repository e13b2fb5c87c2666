"""The merged model's README.md: Hub front matter (lineage, tags, license), the recipe and a short report."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from merge_ops.params import CATALOG

if TYPE_CHECKING:
    from merge_ops.pipeline import MergeReport
    from merge_ops.recipe import Recipe

_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)


def read_front_matter(readme: Path) -> dict[str, Any]:
    """YAML front matter of a model card, or {} (a missing or malformed card is no error)."""
    try:
        match = _FRONT_MATTER.match(readme.read_text(encoding="utf-8"))
        data = yaml.safe_load(match[1]) if match else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def card_metadata(
    *, recipe: Recipe, base_models: list[str], base_card: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Front matter the Hub understands: ``base_model`` (list), tags, library_name, license from the base."""
    hub_ids = [_hub_id(m) for m in base_models]
    meta: dict[str, Any] = {
        "base_model": [m for m in hub_ids if m] or None,
        "tags": ["merge", "alloy", recipe.method],
        "library_name": "transformers",
    }
    if base_card and base_card.get("license"):
        meta["license"] = base_card["license"]
    return {k: v for k, v in meta.items() if v is not None}


def _hub_id(label: str) -> str | None:
    """``hf://org/name@rev`` -> ``org/name``; local paths are not Hub lineage."""
    match = re.match(r"^hf://([\w.\-]+/[\w.\-]+)", label)
    return match[1] if match else None


def render_model_card(
    *, recipe: Recipe, report: MergeReport, base_models: list[str], base_card: dict[str, Any] | None = None
) -> str:
    info = CATALOG[recipe.method]
    meta = card_metadata(recipe=recipe, base_models=base_models, base_card=base_card)
    recipe_yaml = yaml.safe_dump(
        _without_server_paths(recipe.model_dump(mode="json", by_alias=True, exclude_defaults=True)),
        sort_keys=False,
    )
    totals = report.totals
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        "# Merged model",
        "",
        f"Merged with [Alloy](https://pypi.org/project/alloy/) {report.alloy_version} using "
        f"**{info.pretty_name}** ([paper]({info.reference_url})): {info.summary}",
        "",
        "## Sources",
        "",
        *[f"- {_public(m)}" for m in base_models],
        *[f"- {_source_label(m.source)} (weight {m.weight})" for m in recipe.models],
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.strip(),
        "```",
        "",
        "## Report",
        "",
        f"- tensors: {totals.get('merged', 0)} merged, {totals.get('copied', 0)} copied from the base",
        f"- scope of statistics: {report.scope}",
    ]
    for key, label in (("kept_density", "kept density"), ("sign_conflict_rate", "TIES sign-conflict rate")):
        if key in totals:
            lines.append(f"- {label} (weighted by tensor size): {totals[key]:.4f}")
    if report.lines:
        lines.append(f"- LiNeS: α = {report.lines['alpha']:.4g}, β = {report.lines['beta']:.4g}")
    lines += [f"- recipe sha256: `{report.recipe_digest}`", ""]
    return "\n".join(lines)


def _source_label(source: Any) -> str:
    return _public(source.uri() if hasattr(source, "uri") else str(source))


#: recipe keys whose string values are server paths (sources, output folder, evaluator files)
_PATH_KEYS = {"base", "base_lora", "source", "source_base", "source_finetuned", "target_base", "lora", "path"}
_PATH_KEYS |= {"data", "model"}


def _public(label: str) -> str:
    """What a published card may say about a source: its Hub id, or a local folder's name (never the server's
    absolute path, which tells readers nothing and leaks the server's layout)."""
    if label.startswith("hf://") or not label.startswith(("/", "~")):
        return label
    return Path(label).name or label


def _without_server_paths(value: Any, key: str | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _without_server_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_server_paths(v, key) for v in value]
    if isinstance(value, str) and key in _PATH_KEYS:
        return _public(value)
    return value


def write_model_card(
    folder: Path,
    *,
    recipe: Recipe,
    report: MergeReport,
    base_models: list[str],
    base_card: dict[str, Any] | None = None,
) -> Path:
    """Write README.md into ``folder``; ``base_card`` is the base's front matter (for its license)."""
    readme = folder / "README.md"
    readme.write_text(
        render_model_card(recipe=recipe, report=report, base_models=base_models, base_card=base_card),
        encoding="utf-8",
    )
    return readme
