"""The method catalog: ids, names, papers and pydantic params models, without importing torch.

The API process lists and validates methods from here and never imports torch; the implementations in
``merge_ops/methods/`` attach themselves to these entries through ``registry.register_method``. A method is
declared here once (metadata + params) and implemented there once.

Task-vector methods are presets of one pipeline (spec: sparsify -> consensus -> aggregate -> scale), so their
params models share ``StagesParams`` and differ only in defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Scope(StrEnum):
    per_tensor = "per_tensor"
    per_row = "per_row"
    global_ = "global"


class Sparsify(StrEnum):
    none = "none"
    magnitude = "magnitude"
    dare = "dare"
    breadcrumbs = "breadcrumbs"
    compeft = "compeft"


class Consensus(StrEnum):
    none = "none"
    ties_sign = "ties_sign"


class Aggregate(StrEnum):
    sum = "sum"
    mean = "mean"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SoupParams(Params):
    """Uniform or weighted average of the models' weights: θ = Σ w_t θ_t / Σ w_t."""

    normalize: bool = Field(True, description="Divide by the sum of weights (false: plain weighted sum).")


class GreedySoupParams(Params):
    """No parameters: the recipe's ``evaluator`` chooses the ingredients; the soup is their uniform mean."""


class ModelStockParams(Params):
    filter_wise: bool = Field(
        False, description="Compute the angle per row instead of per tensor (mergekit)."
    )
    cosine_clamp: Literal["nonnegative", "mergekit"] = Field(
        "nonnegative",
        description="nonnegative: cos clamped to [0, 1] (never extrapolates); mergekit: each pairwise cos "
        "clamped to [-1, 1] and t = 0 where 1 + (N-1)·cos is 0 (mergekit configs use this).",
    )


class TransferParams(Params):
    """θ_target + λ·(θ_source_finetuned − θ_source_base), the diff in float64."""

    lambda_: float = Field(1.0, alias="lambda", ge=-10, le=10, description="Scale of the transferred diff.")


# Field types shared by the presets, so a preset only restates a default.
SparsifyField = Annotated[Sparsify, Field(description="How each task vector is sparsified.")]
ConsensusField = Annotated[
    Consensus, Field(description="ties_sign: keep entries agreeing with the elected sign.")
]
AggregateField = Annotated[
    Aggregate, Field(description="sum: Σ w·τ; mean: divide by Σ w of the contributors.")
]
Density = Annotated[float, Field(gt=0, le=1, description="Fraction of entries kept, in (0, 1].")]
TopRemoved = Annotated[
    float, Field(ge=0, lt=1, description="Breadcrumbs: fraction of the largest entries dropped.")
]
Lambda = Annotated[
    float, Field(alias="lambda", ge=-10, le=10, description="Global scale of the merged delta.")
]


class StagesParams(Params):
    """The composable task-vector pipeline; the named presets below only change the defaults."""

    sparsify: SparsifyField = Sparsify.none
    consensus: ConsensusField = Consensus.none
    aggregate: AggregateField = Aggregate.sum
    density: Density = 1.0
    top_removed: TopRemoved = 0.0
    rescale: Literal["inverse", "l1", "none"] = Field(
        "inverse", description="DARE rescale: ÷density (paper), match the L1 norm (mergekit), or none."
    )
    alpha: float = Field(1.0, gt=0, le=100, description="ComPEFT: the ternary magnitude is alpha·σ.")
    lambda_: Lambda = 1.0

    @model_validator(mode="after")
    def _check_fractions(self) -> Self:
        if self.density + self.top_removed > 1 + 1e-12:
            raise ValueError("density + top_removed must be at most 1")
        return self


class TaskArithmeticParams(StagesParams):
    """θ_0 + λ·Σ w_t τ_t; negative weights negate (forgetting)."""


class TiesParams(StagesParams):
    """Magnitude top-k, sign election, disjoint mean."""

    sparsify: SparsifyField = Sparsify.magnitude
    consensus: ConsensusField = Consensus.ties_sign
    aggregate: AggregateField = Aggregate.mean
    density: Density = 0.2


class DareLinearParams(StagesParams):
    """Random drop and rescale, then sum."""

    sparsify: SparsifyField = Sparsify.dare
    density: Density = 0.1


class DareTiesParams(TiesParams):
    """Random drop and rescale, sign election, disjoint mean."""

    sparsify: SparsifyField = Sparsify.dare
    density: Density = 0.1


class BreadcrumbsParams(StagesParams):
    """Drop the largest outliers and the small tail, then sum (λ 0.2: the authors' search seed)."""

    sparsify: SparsifyField = Sparsify.breadcrumbs
    density: Density = 0.15
    top_removed: TopRemoved = 0.006
    lambda_: Lambda = 0.2


class BreadcrumbsTiesParams(TiesParams):
    """Breadcrumbs masks, sign election, disjoint mean."""

    sparsify: SparsifyField = Sparsify.breadcrumbs
    density: Density = 0.15
    top_removed: TopRemoved = 0.006


class CompeftParams(StagesParams):
    """Magnitude top-k then ternarize to ±α·σ, then sum."""

    sparsify: SparsifyField = Sparsify.compeft
    density: Density = 0.2


class LinesParams(Params):
    """LiNeS layer scaling of a merged delta: λ(ℓ) = α + β·ℓ/(L−1)."""

    alpha: float | None = Field(None, gt=0, le=10, description="Scale of the first block; null: automatic.")
    beta: float = Field(0.5, ge=-10, le=10, description="Added scale at the last block.")
    head_scale: Literal["alpha", "alpha_plus_beta"] = Field(
        "alpha", description="Scale of output-side tensors outside the blocks (final norm, lm_head)."
    )


class LinesMethodParams(LinesParams):
    """The ``lines`` method: task arithmetic (sum of task vectors, λ) with LiNeS scaling."""

    lambda_: Lambda = 1.0


@dataclass(frozen=True)
class MethodInfo:
    name: str
    pretty_name: str
    reference_url: str
    params: type[Params]
    summary: str
    needs_base: bool = True
    #: Scope of statistics when the recipe sets none.
    default_scope: Scope = Scope.per_tensor
    #: ``transfer`` takes three named models instead of ``base`` + ``models``.
    kind: Literal["task_vector", "soup", "transfer"] = "task_vector"
    min_models: int = 1


_PAPERS = {
    "soup": "https://arxiv.org/abs/2203.05482",
    "ta": "https://arxiv.org/abs/2212.04089",
    "ties": "https://arxiv.org/abs/2306.01708",
    "dare": "https://arxiv.org/abs/2311.03099",
    "breadcrumbs": "https://arxiv.org/abs/2312.06795",
    "compeft": "https://arxiv.org/abs/2311.13171",
    "stock": "https://arxiv.org/abs/2403.19522",
    "lines": "https://arxiv.org/abs/2410.17146",
    "transfer": "https://arxiv.org/abs/2503.20110",
}

CATALOG: dict[str, MethodInfo] = {
    info.name: info
    for info in [
        MethodInfo(
            "linear",
            "Linear (weighted average)",
            _PAPERS["soup"],
            SoupParams,
            "Weighted average of the models' weights.",
            needs_base=False,
            kind="soup",
        ),
        MethodInfo(
            "model_soup",
            "Model soup (uniform)",
            _PAPERS["soup"],
            SoupParams,
            "Uniform model soup: the average of the fine-tuned weights.",
            needs_base=False,
            kind="soup",
        ),
        MethodInfo(
            "greedy_soup",
            "Greedy soup",
            _PAPERS["soup"],
            GreedySoupParams,
            "Add fine-tunes by held-out score, keeping each only if the soup improves (needs an evaluator).",
            needs_base=False,
            kind="soup",
        ),
        MethodInfo(
            "task_arithmetic",
            "Task arithmetic",
            _PAPERS["ta"],
            TaskArithmeticParams,
            "Add scaled task vectors to the base; negative weights remove a skill.",
        ),
        MethodInfo(
            "ties",
            "TIES-Merging",
            _PAPERS["ties"],
            TiesParams,
            "Trim small deltas, elect a sign per entry, average the agreeing ones.",
        ),
        MethodInfo(
            "dare_linear",
            "DARE (linear)",
            _PAPERS["dare"],
            DareLinearParams,
            "Randomly drop deltas and rescale the rest, then add them up.",
        ),
        MethodInfo(
            "dare_ties",
            "DARE + TIES",
            _PAPERS["dare"],
            DareTiesParams,
            "DARE drop-and-rescale followed by TIES sign election and disjoint mean.",
        ),
        MethodInfo(
            "breadcrumbs",
            "Model Breadcrumbs",
            _PAPERS["breadcrumbs"],
            BreadcrumbsParams,
            "Drop the largest outliers and the small tail of each task vector, then add.",
        ),
        MethodInfo(
            "breadcrumbs_ties",
            "Model Breadcrumbs + TIES",
            _PAPERS["breadcrumbs"],
            BreadcrumbsTiesParams,
            "Breadcrumbs masks with TIES sign election and disjoint mean.",
        ),
        MethodInfo(
            "compeft",
            "ComPEFT",
            _PAPERS["compeft"],
            CompeftParams,
            "Sparsify and ternarize each task vector to ±α·σ, then add.",
            default_scope=Scope.global_,
        ),
        MethodInfo(
            "model_stock",
            "Model Stock",
            _PAPERS["stock"],
            ModelStockParams,
            "Interpolate between the base and the average by the fine-tunes' angle.",
            min_models=2,
        ),
        MethodInfo(
            "lines",
            "LiNeS",
            _PAPERS["lines"],
            LinesMethodParams,
            "Task arithmetic with layer-increasing scaling of the merged delta.",
        ),
        MethodInfo(
            "transfer",
            "Fine-tuning transfer",
            _PAPERS["transfer"],
            TransferParams,
            "Add a source fine-tune's diff onto a new target base.",
            kind="transfer",
        ),
        MethodInfo(
            "stages",
            "Custom stages",
            _PAPERS["ties"],
            StagesParams,
            "Set the sparsify, consensus and aggregate stages directly.",
        ),
    ]
}


def method_info(name: str) -> MethodInfo:
    from merge_ops.errors import UnknownMethodError

    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {known}", method=name) from None
