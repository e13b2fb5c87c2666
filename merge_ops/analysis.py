"""Task-vector statistics that help choose a method: per-layer norms, pairwise cosine, sign conflicts.

Streams one tensor at a time like a merge (memory: K task vectors of the largest tensor). Layers are the blocks of
``merge_ops.lines.find_block``; tensors outside a block are grouped as ``"other"``. The sign-conflict rate of a
layer is the fraction of its entries where some task vectors are positive and others negative (where TIES' sign
election has to drop something).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from merge_ops.lines import find_block
from merge_ops.preflight import FLOAT_CODES
from merge_ops.recipe import Source
from merge_ops.sources import SourceResolver, local_path, open_source


def inspect_task_vectors(
    base: Source, models: list[Source], *, resolver: SourceResolver | None = None, allow_pickle: bool = False
) -> dict[str, Any]:
    """Statistics of τ_t = θ_t − θ_0 for each model; JSON-able."""
    opened = []
    try:
        ref = open_source(local_path(base, resolver=resolver), allow_pickle=allow_pickle)
        opened.append(ref)
        srcs = [open_source(local_path(m, resolver=resolver), allow_pickle=allow_pickle) for m in models]
        opened += srcs
        return _statistics(ref, srcs, [str(m) for m in models])
    finally:
        for src in opened:
            with contextlib.suppress(Exception):
                src.close()


def _statistics(ref: Any, srcs: list[Any], labels: list[str]) -> dict[str, Any]:
    k = len(srcs)
    dots = torch.zeros((k, k), dtype=torch.float64)
    layers: dict[str, dict[str, Any]] = {}
    for name, info in ref.infos.items():
        if info.dtype not in FLOAT_CODES:
            continue
        base = ref.load(name).float()
        taus = torch.stack(
            [
                torch.zeros_like(base)
                if s.sparse_coverage and name not in s.infos
                else s.task_vector(name, base)
                for s in srcs
            ]
        ).reshape(k, -1)
        flat64 = taus.double()
        dots += flat64 @ flat64.T
        block = find_block(name)
        key = f"{block[0]}{block[1]}" if block else "other"
        layer = layers.setdefault(
            key,
            {
                "layer": key,
                "index": block[1] if block else None,
                "sq_norm": [0.0] * k,
                "conflicts": 0,
                "numel": 0,
            },
        )
        sq = (flat64 * flat64).sum(dim=1)
        layer["sq_norm"] = [a + float(b) for a, b in zip(layer["sq_norm"], sq, strict=True)]
        positive = (taus > 0).any(dim=0)
        negative = (taus < 0).any(dim=0)
        layer["conflicts"] += int((positive & negative).sum())
        layer["numel"] += taus.shape[1]
    norms = dots.diagonal().sqrt()
    denom = torch.outer(norms, norms)
    cosine = torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(dots))
    rows = [
        {
            "layer": v["layer"],
            "index": v["index"],
            "norms": [round(x**0.5, 8) for x in v["sq_norm"]],
            "sign_conflict_rate": round(v["conflicts"] / max(1, v["numel"]), 6),
            "numel": v["numel"],
        }
        for v in sorted(layers.values(), key=lambda v: (v["index"] is None, v["index"] or 0, v["layer"]))
    ]
    total_conflicts = sum(v["conflicts"] for v in layers.values())
    total = sum(v["numel"] for v in layers.values())
    return {
        "models": labels,
        "norms": [round(float(x), 8) for x in norms],
        "cosine": [[round(float(x), 6) for x in row] for row in cosine],
        "sign_conflict_rate": round(total_conflicts / max(1, total), 6),
        "layers": rows,
    }


def format_table(stats: dict[str, Any]) -> str:
    """A plain-text table for terminals: per layer, the norm of each model's task vector and the conflict rate."""
    labels = [f"m{i}" for i in range(len(stats["models"]))]
    header = ["layer", *[f"|τ_{lbl}|" for lbl in labels], "sign conflicts"]
    body = [
        [r["layer"], *[f"{n:.4g}" for n in r["norms"]], f"{r['sign_conflict_rate']:.3f}"]
        for r in stats["layers"]
    ]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body]]
    out.append("")
    out.append("models: " + ", ".join(f"{lbl} = {m}" for lbl, m in zip(labels, stats["models"], strict=True)))
    out.append("cosine similarity of task vectors:")
    for lbl, row in zip(labels, stats["cosine"], strict=True):
        out.append(f"  {lbl}: " + " ".join(f"{x:+.3f}" for x in row))
    out.append(f"overall sign-conflict rate: {stats['sign_conflict_rate']:.4f}")
    return "\n".join(out)
