"""The recipe's ``evaluator`` section: which held-out scorer greedy soup uses, and on which data.

Torch-free: the API validates it without importing torch or transformers. ``kind`` is a built-in evaluator or
the name of an entry point in the ``alloy.evaluators`` group (checked from package metadata, nothing imported).
``data`` is a JSONL file; a relative path is resolved against the data root by the caller (the API confines
it to ``settings.data_dirs``; an uploaded file is stored under a data root and named here).
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: A plugin option: typed and flat, so a recipe can't carry an arbitrary (or alias-expanded) tree here.
OptionScalar = Annotated[str, Field(max_length=4096)] | int | float | bool | None
OptionValue = OptionScalar | Annotated[list[OptionScalar], Field(max_length=256)]

BUILTIN_EVALUATORS = ("causal_lm_loss", "sequence_classification_accuracy", "embedding_prompt_accuracy")
ENTRY_POINT_GROUP = "alloy.evaluators"


def available_evaluator_names() -> list[str]:
    """Built-in names plus the installed ``alloy.evaluators`` entry points (metadata only, no import)."""
    from importlib.metadata import entry_points

    plugins = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(set(BUILTIN_EVALUATORS) | plugins)


class EvaluatorSpec(BaseModel):
    """A held-out scorer: higher scores are better (losses are negated)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(
        description="causal_lm_loss | sequence_classification_accuracy | embedding_prompt_accuracy "
        "| an installed alloy.evaluators plugin."
    )
    data: str = Field(min_length=1, description="JSONL held-out file (never the test split).")
    text_field: str = Field("text", min_length=1)
    label_field: str = Field("label", min_length=1)
    task_field: str | None = Field(
        None,
        description="embedding_prompt_accuracy: rows carry a task name; the score is the mean of the "
        "per-task accuracies, each with that task's class names.",
    )
    classes: list[str] | dict[str, list[str]] | None = Field(
        None,
        description="Class names in label order (a dict of them per task with task_field). "
        "sequence_classification_accuracy: optional, maps string labels to ids.",
    )
    prompt_template: str = Field(
        "{}", description="embedding_prompt_accuracy: text embedded for each class name."
    )
    pooling: Literal["mean", "cls"] = Field(
        "mean", description="embedding_prompt_accuracy: sentence pooling."
    )
    batch_size: int = Field(16, ge=1, le=1024)
    max_examples: int | None = Field(None, ge=1, description="Use only the first N rows.")
    max_length: int = Field(256, ge=2, le=8192, description="Tokens per example (longer ones are truncated).")
    model: str | None = Field(
        None,
        description="Folder giving the architecture, config and tokenizer; default: the recipe's base, "
        "else its first model. embedding_prompt_accuracy embeds the class prompts with it.",
    )
    options: dict[str, OptionValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Extra settings for plugin evaluators: scalars or short lists of scalars.",
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        names = available_evaluator_names()
        if kind not in names:
            raise ValueError(f"unknown evaluator {kind!r}; known: {', '.join(names)}")
        return kind

    @field_validator("prompt_template")
    @classmethod
    def _one_slot(cls, template: str) -> str:
        if template.count("{}") != 1:
            raise ValueError("prompt_template must contain exactly one '{}' for the class name")
        return template

    @model_validator(mode="after")
    def _classes_fit_kind(self) -> Self:
        if self.kind == "embedding_prompt_accuracy":
            if not self.classes:
                raise ValueError("embedding_prompt_accuracy needs classes (the class names)")
            if (self.task_field is None) != isinstance(self.classes, list):
                raise ValueError(
                    "with task_field, classes must map each task to its class names; without it, "
                    "classes is one list"
                )
        return self
