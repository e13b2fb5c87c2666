"""Request and response models of the HTTP API (the recipe itself is ``merge_ops.recipe.Recipe``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_ops.recipe import Source, parse_source

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKind = Literal["merge", "analyze"]
Priority = Field(5, ge=0, le=9, description="0..9, higher runs first.")


class ErrorItem(BaseModel):
    loc: list[str]
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable machine-readable error code.")
    errors: list[ErrorItem] | None = None


class JobProgress(BaseModel):
    tensors_done: int
    tensors_total: int | None
    bytes_done: int
    bytes_total: int | None
    eta_s: float | None
    fraction: float | None = Field(
        description="bytes_done / bytes_total of the current phase (tensors_done / tensors_total without bytes)."
    )
    phase: str | None = Field(
        None,
        description="What the counts measure: merge (the main pass), global_stats or lines_alpha (a first pass "
        "reading every merged tensor), evaluate (greedy soup), train (aTLAS).",
    )


class Output(BaseModel):
    path: str | None
    url: str | None
    commit: str | None


JobName = Field(None, max_length=200, description="A label for lists (not part of the recipe).")


class JobOut(BaseModel):
    id: str
    name: str | None = JobName
    kind: JobKind
    status: JobStatus
    url: str
    priority: int
    batch_id: str | None
    attempts: int
    cancel_requested: bool
    progress: JobProgress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    output: Output
    error: Problem | None
    recipe: dict[str, Any]
    recipe_digest: str
    pinned_sources: dict[str, str]


class OutputFile(BaseModel):
    name: str = Field(description="Path relative to the job's output folder.")
    bytes: int


class OutputFiles(BaseModel):
    path: str = Field(description="The output folder on the server.")
    files: list[OutputFile]
    total_bytes: int


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipes: list[dict[str, Any] | str] = Field(
        min_length=1, max_length=100, description="Recipes as JSON objects or YAML text (Alloy or mergekit)."
    )
    priority: int = Priority
    names: list[str] | None = Field(
        None, max_length=100, description="One label per recipe, in order (e.g. the swept value)."
    )

    @model_validator(mode="after")
    def _one_name_each(self) -> BatchRequest:
        if self.names is not None:
            if len(self.names) != len(self.recipes):
                raise ValueError(f"names has {len(self.names)} entries for {len(self.recipes)} recipes")
            if any(len(n) > 200 for n in self.names):
                raise ValueError("a name has at most 200 characters")
        return self


class JobScore(BaseModel):
    """The evaluator's score of one finished job, from its report."""

    job_id: str
    metric: str = Field(
        description="greedy_soup.final_score: the chosen soup's held-out score (higher is better; a loss is "
        "negated); atlas.final_loss: the evaluator's loss after training (lower is better)."
    )
    value: float
    higher_is_better: bool


class BatchOut(BaseModel):
    id: str
    url: str
    priority: int
    created_at: datetime
    total: int
    counts: dict[str, int] = Field(description="Jobs by status (every status listed).")
    jobs: list[JobOut]
    scores: list[JobScore] = Field(
        default_factory=list,
        description="The evaluator's score of each succeeded job whose method scores its result (greedy_soup, "
        "atlas with training steps), for a sweep's comparison table; empty when no job has one.",
    )


class AnalysisRequest(BaseModel):
    """Statistics of task vectors (norms, sign conflicts, overlap) for ``sources`` against ``base``."""

    model_config = ConfigDict(extra="forbid")

    sources: list[Source] = Field(min_length=1, max_length=32)
    # required: the statistics are of τ = θ_t − θ_0, so there is nothing to compute without θ_0
    base: Source = Field(description="The base model the task vectors are taken against.")
    allow_pickle: bool = False
    priority: int = Priority

    @field_validator("sources")
    @classmethod
    def _parse_sources(cls, sources: list[Source]) -> list[Source]:
        for source in sources:
            parse_source(source)  # ValueError: a malformed hf:// URI or repo id, NUL in a path
        return sources

    @field_validator("base")
    @classmethod
    def _parse_base(cls, base: Source) -> Source:
        parse_source(base)
        return base


class RecipePlan(BaseModel):
    recipe: dict[str, Any] = Field(description="The normalized recipe, as /v1/recipes/validate returns it.")
    plan: dict[str, Any] | None = Field(
        description="The dry run's plan (tensors, bytes_read, bytes_written, largest_tensor_bytes, "
        "estimated_peak_bytes, passes); null when a source is read from the Hub at run time."
    )
    notes: list[str] = Field(description="What the preflight could not check here, and why.")


class MethodOut(BaseModel):
    name: str
    pretty_name: str
    reference_url: str
    summary: str
    needs_base: bool
    kind: str
    default_scope: str
    min_models: int
    lines_applies: bool = Field(
        description="Whether a recipe's `lines` (LiNeS layer scaling) makes sense here."
    )
    params_schema: dict[str, Any]
    defaults: dict[str, Any]


class Check(BaseModel):
    ok: bool
    detail: str


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, Check]


class ModelFacts(BaseModel):
    """What a checkpoint is, from its config and its safetensors headers (no tensor is read)."""

    kind: Literal["checkpoint", "adapter"] = Field(
        description="adapter: a folder with adapter_config.json (LoRA)."
    )
    architecture: str | None = Field(None, description="config.json's architectures[0].")
    model_type: str | None = Field(None, description="config.json's model_type (an adapter's peft_type).")
    base_model: str | None = Field(None, description="An adapter's base_model_name_or_path.")
    parameters: int | None = Field(None, description="Elements of every tensor in the safetensors headers.")
    bytes: int | None = Field(
        None, description="Size of the safetensors files (local) or the repo's files (Hub)."
    )
    dtypes: list[str] = Field(default_factory=list)
    files: int = Field(0, description="safetensors files.")
    problem: str | None = Field(
        None, description="Why some header could not be read (the listing still works)."
    )


class FolderEntry(BaseModel):
    name: str
    path: str = Field(description="Absolute path inside the data dirs: put it in a model's `source`.")
    model: ModelFacts | None = Field(description="None: a plain folder (no config or safetensors in it).")


class FolderListing(BaseModel):
    path: str | None = Field(description="The listed folder; None: the data dirs themselves are the entries.")
    parent: str | None = Field(description="The folder above, while it is inside the data dirs.")
    model: ModelFacts | None = Field(description="The listed folder itself, when it is a checkpoint.")
    entries: list[FolderEntry]
    truncated: bool = Field(description="More sub-folders than a listing shows (the first 500 by name).")


class HubModel(BaseModel):
    repo: str
    revision: str | None = Field(None, description="The commit the facts are read at.")
    private: bool | None = None
    gated: bool | str | None = None
    model: ModelFacts | None = Field(
        None, description="Architecture (the repo's config) and size (the Hub's safetensors metadata)."
    )
    problem: str | None = Field(None, description="Why the details of this repo could not be read.")


class HubSearch(BaseModel):
    search: str
    items: list[HubModel]
