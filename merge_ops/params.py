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
from typing import Annotated, Any, Literal, Self

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


class SlerpParams(Params):
    """Spherical interpolation from the base (t = 0) to the other model (t = 1), over the whole tensor."""

    t: float = Field(
        allow_inf_nan=False,
        description="Interpolation factor: 0 gives the base (or the first model), 1 the other model.",
    )


class NuslerpParams(Params):
    """SLERP of two models' task vectors (or weights, without a base), t = w₂/(w₁ + w₂)."""

    nuslerp_row_wise: bool = Field(False, description="Interpolate column vectors (dim 0) instead of rows.")
    nuslerp_flatten: bool = Field(True, description="Interpolate the whole tensor as one vector.")


class MultislerpParams(Params):
    """Weighted barycentric interpolation of any number of models on the hypersphere."""

    normalize_weights: bool = Field(True, description="Divide the weights by their sum.")
    eps: float = Field(1e-8, ge=0, le=1, description="Numerical floor of norms.")


class KarcherParams(Params):
    """Riemannian (Karcher) mean of the models' directions on the unit sphere, times their mean norm."""

    max_iter: int = Field(10, ge=0, le=1000, description="Iterations of the fixed-point update.")
    tol: float = Field(1e-5, ge=0, le=1, description="Stop when the tangent step is below this.")


class NearswapParams(Params):
    """Take the other model's value where it is within ``t`` of the base, interpolate beyond."""

    t: float = Field(allow_inf_nan=False, description="Similarity threshold on |θ_1 − θ_0|.")


class DellaParams(Params):
    """DELLA: magnitude-ranked random drop (MagPrune), L1 rescale, sign election, disjoint mean."""

    density: Density = 1.0
    epsilon: float = Field(
        0.15,
        allow_inf_nan=False,
        description="Half-width of the keep probabilities: from density − ε (smallest) to density + ε.",
    )
    normalize: bool = Field(True, description="Divide by the sum of the contributing weights.")
    rescale: bool = Field(True, description="Rescale each pruned task vector to its original L1 norm.")
    lambda_: Lambda = 1.0

    @model_validator(mode="after")
    def _check_epsilon(self) -> Self:
        check_della_window(self.density, self.epsilon)
        return self


def check_della_window(density: float, epsilon: float) -> None:
    """mergekit's rule: when pruning (density < 1), density ± epsilon must lie inside (0, 1)."""
    if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(f"epsilon {epsilon} with density {density}: density ± epsilon must be inside (0, 1)")


class DellaLinearParams(DellaParams):
    """DELLA without sign election; a plain weighted sum by default."""

    normalize: bool = Field(False, description="Divide by the sum of the weights.")


class SceParams(Params):
    """SCE: select high-variance entries, weight models by their mean square, sign election, weighted mean."""

    select_topk: float = Field(
        1.0,
        allow_inf_nan=False,
        description="Fraction of the entries with non-zero variance across models kept (≥ 1: all, ≤ 0: none).",
    )


class RamParams(Params):
    """RAM: average each entry over the models that change it (|τ| > epsilon)."""

    epsilon: float = Field(
        1e-5, ge=0, allow_inf_nan=False, description="An entry counts as changed above this."
    )


class RamplusTlParams(RamParams):
    """RAM+ (tensor-local): RAM, with each model's unique entries boosted by its overlap ratio."""

    r: float = Field(0.1, allow_inf_nan=False, description="Boost factor of the unique entries.")
    alpha: float = Field(0.2, allow_inf_nan=False, description="Cap of the overlap ratio ρ.")


class ArceeFusionParams(Params):
    """No parameters: the threshold is derived from the importance scores of each tensor."""


class SparseSoupParams(Params):
    """Weighted mean of models that share one sparsity pattern (Zimmer et al., Sparse Model Soups)."""

    mask: Literal["intersection", "union"] | None = Field(
        None,
        description=(
            "Unset: the models' zero patterns must agree (else an error names the first tensor that differs). "
            "intersection: zero wherever any model is zero; union: the plain mean (zero only where all are)."
        ),
    )


Coefficient = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class AtlasParams(Params):
    """aTLAS: one coefficient per task vector and parameter block (tensor), learned on a few-shot objective."""

    lambda_: float = Field(
        0.3, alias="lambda", gt=0, le=10, description="Initial coefficient of every task vector and block."
    )
    steps: int = Field(
        20, ge=0, le=10000, description="Adam steps on the evaluator's loss (0: task arithmetic)."
    )
    lr: float = Field(0.05, gt=0, le=10, description="Adam learning rate of the coefficients.")
    objective: Literal["supervised", "entropy"] = Field(
        "supervised",
        description="supervised: cross-entropy on the evaluator's labelled rows; entropy: mean prediction entropy "
        "(test-time adaptation, labels unused).",
    )
    coefficients: dict[str, list[Coefficient]] | None = Field(
        None,
        description="Fixed coefficients per tensor name (one per model); set, nothing is trained. The report of "
        "a trained merge holds the learned ones in this form.",
    )


class PassthroughParams(Params):
    """Copy the single model, optionally scaled."""

    scale: float | None = Field(
        None,
        allow_inf_nan=False,
        description="Multiply the tensor by this (per model or for all); none: copy.",
    )


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
    #: Most models besides the base (None: no limit).
    max_models: int | None = None
    #: Bounds on the inputs as mergekit counts them: the models plus the base when the recipe has one.
    min_inputs: int = 1
    max_inputs: int | None = None
    #: The method reads θ_0 itself (``TensorContext.base``): it interpolates weights, not only task vectors.
    needs_base_weights: bool = False
    #: The method gets the models' weights θ_t themselves (task vectors against a zero reference) and returns
    #: the merged weights (the pipeline adds no base): for exact zero patterns (sparse_soup).
    reads_weights: bool = False
    #: The method weighs its models by w_t; False: it never reads a weight (as in mergekit), so a model weight
    #: other than 1 is refused rather than ignored.
    weighted: bool = True
    #: Params of the method that hold for all models at once (mergekit reads them from the top-level, slice or
    #: module ``parameters`` only): a model cannot set them for itself.
    shared_params: frozenset[str] = frozenset()


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
    "slerp": "https://en.wikipedia.org/wiki/Slerp",
    "multislerp": "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    "karcher": "https://arxiv.org/abs/2603.04972",
    "nearswap": "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    "della": "https://arxiv.org/abs/2406.11617",
    "sce": "https://arxiv.org/abs/2408.07990",
    "ram": "https://arxiv.org/abs/2601.13572",
    "arcee_fusion": "https://arcee.ai",
    "passthrough": "https://github.com/arcee-ai/mergekit",
    "sparse_soup": "https://arxiv.org/abs/2306.16788",
    "atlas": "https://arxiv.org/abs/2407.02880",
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
            weighted=False,
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
        MethodInfo(
            "slerp",
            "SLERP",
            _PAPERS["slerp"],
            SlerpParams,
            "Spherical interpolation between two models (the base and one model, or two models).",
            needs_base=False,
            min_inputs=2,
            max_inputs=2,
            needs_base_weights=True,
            weighted=False,
            shared_params=frozenset(["t"]),
        ),
        MethodInfo(
            "nuslerp",
            "NuSLERP",
            _PAPERS["slerp"],
            NuslerpParams,
            "SLERP of two models' task vectors (or weights without a base), t from their weights.",
            needs_base=False,
            min_models=2,
            max_models=2,
            needs_base_weights=True,
        ),
        MethodInfo(
            "multislerp",
            "Multi-SLERP",
            _PAPERS["multislerp"],
            MultislerpParams,
            "Weighted spherical interpolation of any number of models.",
            needs_base=False,
            needs_base_weights=True,
        ),
        MethodInfo(
            "karcher",
            "Karcher mean",
            _PAPERS["karcher"],
            KarcherParams,
            "Riemannian mean of the models (and the base, if given) on the sphere.",
            needs_base=False,
            needs_base_weights=True,
            weighted=False,
        ),
        MethodInfo(
            "nearswap",
            "NearSwap",
            _PAPERS["nearswap"],
            NearswapParams,
            "Take the model's values where they are close to the base, interpolate toward the base elsewhere.",
            max_models=1,
            needs_base_weights=True,
            weighted=False,
            shared_params=frozenset(["t"]),
        ),
        MethodInfo(
            "della",
            "DELLA",
            _PAPERS["della"],
            DellaParams,
            "Drop deltas at random with magnitude-ranked probabilities, rescale, elect signs, average.",
        ),
        MethodInfo(
            "della_linear",
            "DELLA (linear)",
            _PAPERS["della"],
            DellaLinearParams,
            "DELLA's magnitude-ranked random drop and rescale, then a weighted sum.",
        ),
        MethodInfo(
            "sce",
            "SCE",
            _PAPERS["sce"],
            SceParams,
            "Select high-variance entries, weight models by energy, elect signs, average.",
            weighted=False,
            shared_params=frozenset(["select_topk"]),
        ),
        MethodInfo(
            "ram",
            "RAM",
            _PAPERS["ram"],
            RamParams,
            "Average each entry over the models that change it.",
            weighted=False,
            shared_params=frozenset(["epsilon"]),
        ),
        MethodInfo(
            "ramplus_tl",
            "RAM+ (tensor-local)",
            _PAPERS["ram"],
            RamplusTlParams,
            "RAM with each model's unique entries boosted by its overlap ratio.",
            weighted=False,
            shared_params=frozenset(["epsilon"]),
        ),
        MethodInfo(
            "arcee_fusion",
            "Arcee Fusion",
            _PAPERS["arcee_fusion"],
            ArceeFusionParams,
            "Keep the model's changes whose importance (|Δ| · KL of softmaxes) is an outlier.",
            max_models=1,
            needs_base_weights=True,
            weighted=False,
        ),
        MethodInfo(
            "passthrough",
            "Passthrough",
            _PAPERS["passthrough"],
            PassthroughParams,
            "Copy one model's tensors unchanged, or scaled.",
            needs_base=False,
            max_inputs=1,
            needs_base_weights=True,
            weighted=False,
        ),
        MethodInfo(
            "sparse_soup",
            "Sparse model soup",
            _PAPERS["sparse_soup"],
            SparseSoupParams,
            "Average pruned models that share one sparsity pattern; the soup keeps the pattern.",
            needs_base=False,
            reads_weights=True,
        ),
        MethodInfo(
            "atlas",
            "aTLAS (learned anisotropic scaling)",
            _PAPERS["atlas"],
            AtlasParams,
            "Learn one coefficient per task vector and tensor by gradient descent on a few-shot objective.",
        ),
    ]
}


def default_params(params: type[Params]) -> dict[str, Any]:
    """The defaults of a params model as JSON, by alias; required params (slerp's ``t``) are left out."""
    required = {name for name, field in params.model_fields.items() if field.is_required()}
    if not required:
        return params().model_dump(mode="json", by_alias=True)
    return params.model_construct().model_dump(mode="json", by_alias=True, exclude=required)


def method_info(name: str) -> MethodInfo:
    from merge_ops.errors import UnknownMethodError

    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {known}", method=name) from None
