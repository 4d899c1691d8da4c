"""Keep the quantized base model between rounds, where the client process lives on.

Building the base (read the checkpoint, quantize to 4/8 bits, prepare for k-bit training) costs far
more than a round of LoRA steps on a big model. In simulation a client's process serves every
round, so the PEFT model built in round 1 is kept and reused: the global adapter loaded each round
overwrites every LoRA weight, and each round's trainer makes a new optimizer, so nothing of the
previous round carries over (a test checks the adapter is bit-identical to a fresh build's). In a
deployment's default subprocess isolation each message gets a new process, and this cache is empty
every time: there the base is built per message, as without it. The tokenizer is kept likewise
(loading a real one reads and parses megabytes of vocabulary): trl and generation only read it.
"""

from __future__ import annotations

import gc

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from flowertune_llm.client.model import build_peft_model, load_tokenizer
from flowertune_llm.shared.settings import ModelSettings

_kept: tuple[str, PeftModel] | None = None
_kept_tokenizer: tuple[tuple, PreTrainedTokenizerBase] | None = None


def peft_model(settings: ModelSettings, reuse: bool) -> PeftModel:
    """Return the quantized PEFT model for `settings`: the kept one if allowed and built alike."""
    global _kept
    key = repr(settings)
    if reuse and _kept is not None and _kept[0] == key:
        model = _kept[1]
        # Gradients of the last step of the previous round must not leak into this one.
        model.zero_grad(set_to_none=True)
        return model
    # The model this replaces (kept, or built for an earlier message without reuse) goes first.
    _kept = None
    release_memory()
    model = build_peft_model(settings)
    if reuse:
        _kept = (key, model)
        _exempt_from_collection()
    return model


def _exempt_from_collection() -> None:
    """Take what is alive now (the kept model, the libraries loaded) out of later garbage collections.

    accelerate starts every `trainer.train()` with a full collection (`Accelerator.free_memory`),
    which walks every object of the process: about 600,000 here (torch, transformers, the model's
    modules, Flower, Ray), 0.3 s in one process and 0.5-0.8 s a round in a simulated client
    (2 CPU cores). What is alive once the kept model is built lives as long as the process (or
    until `release_memory` hands it back to the collector), so it is collected once and frozen.
    """
    gc.collect()
    gc.freeze()


def kept_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    """Return the model's tokenizer, loaded once per process and checkpoint."""
    global _kept_tokenizer
    key = (settings.name, settings.trust_remote_code)  # what load_tokenizer reads
    if _kept_tokenizer is None or _kept_tokenizer[0] != key:
        _kept_tokenizer = (key, load_tokenizer(settings))
    return _kept_tokenizer[1]


def release_memory() -> None:
    """Free models nothing refers to any more, and hand their GPU memory back to the driver.

    Dropping the last reference is not enough: trl and accelerate leave bound methods of the
    trainer on the model (a reference cycle), so an old base stays alive until the cycle collector
    runs, and two bases would share the GPU. PyTorch's caching allocator then still holds the
    freed blocks; `empty_cache` returns them, so another process on the same GPU can use them.
    A kept model was frozen out of collections (`_exempt_from_collection`): it is unfrozen first.
    """
    gc.unfreeze()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
