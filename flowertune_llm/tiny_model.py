"""The built-in tiny checkpoints, built locally and deterministically on first use.

Each is saved like any Hugging Face checkpoint (config, safetensors weights, tokenizer) so that the
app loads it through exactly the same `from_pretrained` + bitsandbytes + peft path as a real model.
`builtin:tiny-llama` is the default; `builtin:tiny-mistral`, `builtin:tiny-qwen2` and
`builtin:tiny-phi` have the same size and tokenizer in other architectures, so that tests show
the app is not tied to Llama's module names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from flowertune_llm.builtin_data import generate_examples
from flowertune_llm.prompts import alpaca_prompt

BUILTIN_MODEL_NAME = "builtin:tiny-llama"
# Bump when anything below changes, so stale cached builds are not reused.
BUILD_VERSION = "v1"
VOCAB_SIZE = 512
SEED = 0


def cache_root() -> Path:
    """Return the folder for built models (`FLOWERTUNE_CACHE`, else ~/.cache/flowertune-llm)."""
    configured = os.environ.get("FLOWERTUNE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "flowertune-llm"


# What every tiny architecture shares: the tiny tokenizer's special tokens and a small width.
_SHARED = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # Wider than Llama's 0.02: the frozen lm_head must allow confident logits, since LoRA
    # never touches it; with 0.02 the loss cannot fall far below log(vocab_size).
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_llama_config() -> LlamaConfig:
    """Return the architecture: 2 layers, width 128, grouped-query attention like Llama 3."""
    return LlamaConfig(**_SHARED, rms_norm_eps=1e-5)


def tiny_mistral_config() -> MistralConfig:
    """Return a tiny Mistral (sliding-window attention; Llama's module names)."""
    return MistralConfig(**_SHARED, rms_norm_eps=1e-5, sliding_window=128)


def tiny_qwen2_config() -> Qwen2Config:
    """Return a tiny Qwen2 (biases on q/k/v projections)."""
    return Qwen2Config(**_SHARED, rms_norm_eps=1e-5)


def tiny_phi_config() -> PhiConfig:
    """Return a tiny Phi (LayerNorm, partial rotary, `dense`/`fc1`/`fc2` instead of Llama's names)."""
    return PhiConfig(**_SHARED, layer_norm_eps=1e-5, partial_rotary_factor=0.5)


BUILTIN_CONFIGS = {
    BUILTIN_MODEL_NAME: tiny_llama_config,
    "builtin:tiny-mistral": tiny_mistral_config,
    "builtin:tiny-qwen2": tiny_qwen2_config,
    "builtin:tiny-phi": tiny_phi_config,
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in data, so prompts take few tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [
        alpaca_prompt(example["instruction"], example["input"]) + example["output"]
        for example in generate_examples()
    ]
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_tiny_model(directory: Path, model_config: PretrainedConfig) -> None:
    """Write a tiny checkpoint (random weights from a fixed seed) and the tiny tokenizer."""
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(model_config)
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer().save_pretrained(directory)


def build_tiny_llama(directory: Path) -> None:
    """Write the default tiny Llama checkpoint and its tokenizer."""
    build_tiny_model(directory, tiny_llama_config())


def ensure_tiny_llama() -> Path:
    """Return the folder of the default built-in checkpoint, building it once per cache folder."""
    return ensure_builtin_model(BUILTIN_MODEL_NAME)


def ensure_builtin_model(name: str) -> Path:
    """Return the folder of built-in checkpoint `name` (a key of BUILTIN_CONFIGS), building it once."""
    slug = name.removeprefix("builtin:")
    return build_once(cache_root() / f"{slug}-{BUILD_VERSION}",
                      lambda folder: build_tiny_model(folder, BUILTIN_CONFIGS[name]()))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, first filling it with `build(folder)` unless a checkpoint is already there."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename: clients starting at once never see a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename: clients starting at once never see a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{slug}-", dir=target.parent))
    try:
        build_tiny_model(staging, BUILTIN_CONFIGS[name]())
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
