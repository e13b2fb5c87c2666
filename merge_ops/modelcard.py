"""The model card (README.md), written once: at merge time beside the shards, and completed at publish time.

``render_model_card`` writes the merged folder's card: Hub front matter (lineage, tags, license), the recipe
and a short report. ``with_front_matter`` is the publish step's: it merges the destination's front matter
(``front_matter``: the same builder) into the card being pushed. Local paths never reach a card: a source is
named by its Hub id, or by its folder name (the server's absolute paths are nobody's business).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from merge_ops.params import CATALOG

if TYPE_CHECKING:
    from merge_ops.recipe import Loc, Recipe, Source
    from merge_ops.report import MergeReport

MODEL_CARD_TAGS = ("merge", "alloy")
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n?", re.DOTALL)
_HUB_URI = re.compile(r"^hf://([\w.\-]+/[\w.\-]+)")


def read_front_matter(readme: Path) -> dict[str, Any]:
    """YAML front matter of a model card, or {} (a missing or malformed card is no error)."""
    try:
        match = _FRONT_MATTER.match(readme.read_text(encoding="utf-8"))
        data = yaml.safe_load(match[1]) if match else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def front_matter(
    *,
    base_model: list[str],
    method: str | None = None,
    license: str | None = None,
    library_name: str = "transformers",
    extra_tags: Iterable[str] = (),
) -> dict[str, Any]:
    """YAML front matter the Hub understands: base_model list (with relation ``merge`` when several),
    tags [merge, alloy, <method>], library_name, and license when known."""
    tags = list(dict.fromkeys([*MODEL_CARD_TAGS, *([method] if method else []), *extra_tags]))
    metadata: dict[str, Any] = {}
    if base_model:
        metadata["base_model"] = list(dict.fromkeys(base_model))
        if len(metadata["base_model"]) > 1:
            metadata["base_model_relation"] = "merge"
    metadata["library_name"] = library_name
    metadata["tags"] = tags
    if license:
        metadata["license"] = license
    return metadata


def with_front_matter(
    metadata: dict[str, Any], *, existing: str | None = None, body: str | None = None
) -> str:
    """A README.md: ``metadata`` merged into an existing card's front matter (its keys win; tags are united),
    followed by ``body``, the existing body, or a one-line default."""
    front: dict[str, Any] = {}
    old_body = ""
    if existing:
        match = _FRONT_MATTER.match(existing)
        if match:
            loaded = yaml.safe_load(match[1]) or {}
            front = loaded if isinstance(loaded, dict) else {}
            old_body = existing[match.end() :]
        else:
            old_body = existing
    merged = {**metadata, **front}
    if "tags" in front or "tags" in metadata:
        theirs = front.get("tags") or []
        theirs = [theirs] if isinstance(theirs, str) else list(theirs)
        merged["tags"] = list(dict.fromkeys([*metadata.get("tags", []), *theirs]))
    text = body if body is not None else (old_body.strip() or "This model was merged with Alloy.")
    return f"---\n{yaml.safe_dump(merged, sort_keys=False, allow_unicode=True)}---\n\n{text.strip()}\n"


def source_label(source: Any) -> str:
    """How a card names a source: ``hf://org/name@rev`` as written, a local path by its folder name."""
    if hasattr(source, "uri"):
        return str(source.uri())
    text = str(source)
    return text if text.startswith("hf://") else (Path(text).name or text)


def _hub_id(label: str) -> str | None:
    match = _HUB_URI.match(label)
    return match[1] if match else None


def _card_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as the card shows it: sources by label, no output path, evaluator files by name."""

    def label(_loc: Loc, source: Source) -> Source:
        return source if not isinstance(source, str) else source_label(source)

    shown = recipe.dump_with_sources(label, exclude_defaults=True)
    shown.get("output", {}).pop("path", None)
    if not shown.get("output"):
        shown.pop("output", None)
    for key in ("data", "model"):
        if isinstance(shown.get("evaluator", {}).get(key), str):
            shown["evaluator"][key] = Path(shown["evaluator"][key]).name
    return shown


def render_model_card(
    *, recipe: Recipe, report: MergeReport, base_models: list[str], base_card: dict[str, Any] | None = None
) -> str:
    """The merged folder's README.md; ``base_models`` are the lineage labels, ``base_card`` the base's front
    matter (for its license)."""
    info = CATALOG[recipe.method]
    license_ = base_card.get("license") if base_card else None
    hub_ids = [hub_id for m in base_models if (hub_id := _hub_id(m))]
    meta = front_matter(base_model=hub_ids, method=recipe.method, license=license_)
    recipe_yaml = yaml.safe_dump(_card_recipe(recipe), sort_keys=False, allow_unicode=True)
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
        *[f"- {source_label(m)}" for m in base_models],
        *[f"- {source_label(m.source)} (weight {m.weight})" for m in recipe.models],
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
    if report.greedy_soup:
        chosen = ", ".join(str(i) for i in report.greedy_soup.get("chosen", []))
        lines.append(
            f"- greedy soup: models {chosen} chosen (held-out score {report.greedy_soup['final_score']:.4g})"
        )
    lines += [f"- recipe sha256: `{report.recipe_digest}`", ""]
    return "\n".join(lines)


def write_model_card(
    folder: Path,
    *,
    recipe: Recipe,
    report: MergeReport,
    base_models: list[str],
    base_card: dict[str, Any] | None = None,
) -> Path:
    """Write README.md into ``folder``."""
    readme = folder / "README.md"
    readme.write_text(
        render_model_card(recipe=recipe, report=report, base_models=base_models, base_card=base_card),
        encoding="utf-8",
    )
    return readme
