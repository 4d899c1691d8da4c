"""A node's disk cache of quantized base models (`model.quantized-cache-dir`).

Quantizing is the slow part of building the base: it reads the bf16 checkpoint and packs every
weight into 4 or 8 bits, each time a client process starts. Where a process serves one message
only (a deployment's subprocess isolation), that happens every round. The first build on a node
saves the quantized weights, right after quantization and before any forward pass (bitsandbytes
repacks 4-bit weights on a CPU's first forward); later builds load them as they are, giving the
same model. The entry's name covers everything that decides the packed weights: the checkpoint
(its files' sizes and times, or the hub revision), the bits, and the library versions.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path

from transformers import PreTrainedModel

from flowertune_llm.shared import atomic
from flowertune_llm.shared.devices import training_compute_dtype
from flowertune_llm.shared.settings import ModelSettings


def _source_identity(source: str) -> dict[str, object] | None:
    """Return what identifies the checkpoint's content, or None for a hub model not on disk yet."""
    local = Path(source).expanduser()
    if local.is_dir():
        files = sorted(p for p in local.iterdir() if p.suffix in (".safetensors", ".json"))
        return {"folder": str(local.resolve()),
                "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}
    from huggingface_hub import try_to_load_from_cache

    cached_config = try_to_load_from_cache(source, "config.json")
    if not isinstance(cached_config, str):
        return None
    return {"hub": source, "revision": Path(cached_config).parent.name}


def cache_entry(settings: ModelSettings, source: str) -> Path | None:
    """Return the cache folder for this model, quantization and compute dtype, or None when there is no cache to use.

    An entry's config keeps the compute dtype it was quantized with, so a CPU's entry (float32 compute)
    is not a GPU's (bf16).
    """
    if not settings.quantized_cache_dir or settings.quantization not in (4, 8):
        return None
    identity = _source_identity(source)
    if identity is None:
        return None
    key = {"source": identity, "bits": settings.quantization, "compute": str(training_compute_dtype()),
           "versions": [version(p) for p in ("transformers", "bitsandbytes", "torch")]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = Path(source).name or "model"
    return Path(settings.quantized_cache_dir).expanduser() / f"{name}-{settings.quantization}bit-{digest}"


def save_entry(model: PreTrainedModel, entry: Path) -> None:
    """Save a freshly quantized model as a cache entry, atomically (a staging folder renamed)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic.staged_folder(entry) as staging:
            model.save_pretrained(staging, safe_serialization=True)
    except OSError:
        if not entry.is_dir():  # another client finished the same entry first: keep theirs
            raise
