"""PEFT LoRA adapters as task vectors: ΔW = s·B·A on the adapted modules, zero elsewhere.

``base_model.model.<x>.lora_A.weight`` (r × in) and ``…lora_B.weight`` (out × r) give the delta of
``<x>.weight``; s = lora_alpha / r, or lora_alpha / √r with ``use_rslora`` (Kalajdzievski 2023), with r and
alpha taken per module from ``rank_pattern`` / ``alpha_pattern`` when they match (PEFT's rule: the first
pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``). ``fan_in_fan_out`` (GPT-2 Conv1D, weight
stored in × out) transposes ΔW. Other tensors in the adapter (``modules_to_save``, trained biases) are full
weights, so their task vector is ``w − base``. Conv, embedding and DoRA adapters are refused: their delta is
not B·A on a ``.weight``. Each ΔW is materialized alone, in float32, when asked for.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_ops import patterns
from merge_ops.checkpoint import Checkpoint, TensorInfo
from merge_ops.errors import CorruptCheckpointError, IncompatibleModelsError, SourceNotFoundError

CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
# optional ".<adapter name>" before ".weight" covers files saved without PEFT's name stripping
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_REFUSED = {
    "lora_embedding_A": "embedding LoRA",
    "lora_embedding_B": "embedding LoRA",
    "lora_magnitude_vector": "DoRA",
}


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> LoraConfig:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SourceNotFoundError(f"{path}: no such file", file=str(path)) from None
        except ValueError as exc:
            raise CorruptCheckpointError(f"{path}: not valid JSON ({exc})", file=str(path)) from None
        if not isinstance(raw, dict):
            raise CorruptCheckpointError(f"{path}: not a JSON object", file=str(path))
        peft_type = str(raw.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise IncompatibleModelsError(
                f"{path}: peft_type {peft_type} is not supported (LoRA only)", file=str(path)
            )
        if raw.get("use_dora"):
            raise IncompatibleModelsError(
                f"{path}: DoRA adapters are not supported (their delta is not B·A)", file=str(path)
            )
        try:
            return cls(
                r=int(raw["r"]),
                lora_alpha=float(raw.get("lora_alpha") or 8),  # PEFT's LoraConfig default
                use_rslora=bool(raw.get("use_rslora", False)),
                fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
                rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{path}: bad LoRA config ({exc!r})", file=str(path)) from None

    def rank_for(self, module: str) -> int:
        return _pattern_value(self.rank_pattern, module, self.r)

    def scaling_for(self, module: str) -> float:
        rank = self.rank_for(module)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in pattern.items():
        # the adapter's config is untrusted input (it may come from the Hub): RE2, linear in the module name
        try:
            matched = patterns.search(rf"^(.*\.)?({key})$", module)
        except ValueError:  # not a valid (RE2) regex: PEFT falls back to the literal key too
            matched = patterns.search(rf"^(.*\.)?({re.escape(key)})$", module)
        if matched:
            return value
    return default


@dataclass(frozen=True)
class _LoraPair:
    a: str  # tensor names in the adapter file
    b: str
    scaling: float


class LoraAdapter:
    """A PEFT LoRA adapter folder. ``infos`` lists the full-weight tensors it changes (names and shapes of
    the base's weights); ``delta(name)`` materializes that tensor's float32 task vector."""

    def __init__(self, folder: Path, *, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        self.config = LoraConfig.read(self.folder / CONFIG_NAME)
        weights = self._weights_file(allow_pickle)
        self.checkpoint = Checkpoint.open(weights, allow_pickle=allow_pickle)
        self.pairs: dict[str, _LoraPair] = {}
        #: full weights saved with the adapter (modules_to_save, biases): adapter name -> file tensor name
        self.full: dict[str, str] = {}
        self.infos: dict[str, TensorInfo] = {}
        try:
            self._index()
        except BaseException:
            self.checkpoint.close()
            raise

    def _weights_file(self, allow_pickle: bool) -> Path:
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if (self.folder / name).is_file():
                return self.folder / name
        raise SourceNotFoundError(
            f"{self.folder}: no adapter_model.safetensors next to {CONFIG_NAME}", file=str(self.folder)
        )

    def _index(self) -> None:
        file_infos = self.checkpoint.infos
        parts: dict[str, dict[str, str]] = {}
        for key in file_infos:
            name = key.removeprefix(_PREFIX)
            refused = next((kind for marker, kind in _REFUSED.items() if marker in name), None)
            if refused:
                raise IncompatibleModelsError(
                    f"{self.checkpoint.path}: tensor {key!r}: {refused} adapters are not supported",
                    file=str(self.checkpoint.path),
                    tensor=key,
                )
            match = _LORA_KEY.match(name)
            if match:
                parts.setdefault(match["module"], {})[match["part"]] = key
            else:
                self.full[name] = key
                self.infos[name] = TensorInfo(
                    name=name,
                    dtype=file_infos[key].dtype,
                    shape=file_infos[key].shape,
                    file=file_infos[key].file,
                )
        for module, found in parts.items():
            self._add_pair(module, found, file_infos)

    def _add_pair(self, module: str, found: dict[str, str], file_infos: dict[str, TensorInfo]) -> None:
        path = self.checkpoint.path
        if set(found) != {"A", "B"}:
            present = next(iter(found.values()))
            raise CorruptCheckpointError(
                f"{path}: tensor {present!r} has no lora_A/lora_B partner", file=str(path), tensor=present
            )
        a, b = file_infos[found["A"]], file_infos[found["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise IncompatibleModelsError(
                f"{path}: tensor {a.name!r}: {len(a.shape)}-D LoRA (convolution) is not supported",
                file=str(path),
                tensor=a.name,
            )
        rank = self.config.rank_for(module)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise CorruptCheckpointError(
                f"{path}: tensor {a.name!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not have the "
                f"configured rank {rank}",
                file=str(path),
                tensor=a.name,
            )
        out_features, in_features = b.shape[0], a.shape[1]
        shape = (in_features, out_features) if self.config.fan_in_fan_out else (out_features, in_features)
        name = module + ".weight"
        if name in self.infos:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} is both a LoRA target and a full weight",
                file=str(path),
                tensor=name,
            )
        self.pairs[name] = _LoraPair(a=a.name, b=b.name, scaling=self.config.scaling_for(module))
        self.infos[name] = TensorInfo(name=name, dtype=a.dtype, shape=shape, file=a.file)

    def delta(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 ΔW of ``name`` (``base`` is needed only for full weights saved in the adapter)."""
        pair = self.pairs.get(name)
        if pair is not None:
            a = self.checkpoint.load(pair.a).to(torch.float32)
            b = self.checkpoint.load(pair.b).to(torch.float32)
            delta = (b @ a).mul_(pair.scaling)
            return delta.t().contiguous() if self.config.fan_in_fan_out else delta
        key = self.full.get(name)
        if key is None:
            raise IncompatibleModelsError(f"{self.folder}: the adapter does not touch {name!r}", tensor=name)
        if base is None:
            raise ValueError(
                f"{name!r} is a full weight in the adapter; its task vector needs the base tensor"
            )
        return self.checkpoint.load(key).to(torch.float32) - base.to(torch.float32)

    def close(self) -> None:
        self.checkpoint.close()
