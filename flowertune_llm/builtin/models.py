"""The built-in tiny checkpoints, built locally and deterministically on first use.

Each is saved like any Hugging Face checkpoint (config, safetensors weights, tokenizer) so that the
app loads it through exactly the same `from_pretrained` + bitsandbytes + peft path as a real model.
`builtin:tiny-llama`, the default, is a pretrained base in miniature: at build time it reads the
built-in world's notes (`world.pretraining_notes`, a few minutes on one CPU core), so it
knows the tasks but not the Alpaca format the clients fine-tune it on. `builtin:tiny-mistral`,
`builtin:tiny-qwen2` and `builtin:tiny-phi` have the same size and tokenizer in other
architectures, with random weights: they show that the app is not tied to Llama's module names.
"""

from __future__ import annotations

import fcntl
import os
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

from flowertune_llm.builtin.world import generate_examples, generate_heldout, pretraining_notes
from flowertune_llm.shared import atomic
from flowertune_llm.shared.prompts import alpaca_prompt
from flowertune_llm.shared.registry import BUILTIN_MODELS

# Bump when anything below changes, so stale cached builds are not reused.
BUILD_VERSION = "v2"
VOCAB_SIZE = 1024
SEED = 0
# The base's reading: AdamW over every weight, warm-up then cosine decay, batches of whole notes.
PRETRAIN_STEPS = 1200
PRETRAIN_BATCH = 64
PRETRAIN_LEARNING_RATE = 3e-3
ANSWER_WEIGHT = 4.0


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
    # Llama's own init: the pretraining below, not a wide random head, gives confident logits.
    return LlamaConfig(**{**_SHARED, "initializer_range": 0.02}, rms_norm_eps=1e-5)


def tiny_mistral_config() -> MistralConfig:
    """Return a tiny Mistral (sliding-window attention; Llama's module names)."""
    return MistralConfig(**_SHARED, rms_norm_eps=1e-5, sliding_window=128)


def tiny_qwen2_config() -> Qwen2Config:
    """Return a tiny Qwen2 (biases on q/k/v projections)."""
    return Qwen2Config(**_SHARED, rms_norm_eps=1e-5)


def tiny_phi_config() -> PhiConfig:
    """Return a tiny Phi (LayerNorm, partial rotary, `dense`/`fc1`/`fc2` instead of Llama's names)."""
    return PhiConfig(**_SHARED, layer_norm_eps=1e-5, partial_rotary_factor=0.5)


# The architectures the registry's built-in models name (shared/registry.py BUILTIN_MODELS).
ARCHITECTURES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": tiny_llama_config,
    "mistral": tiny_mistral_config,
    "qwen2": tiny_qwen2_config,
    "phi": tiny_phi_config,
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in world's texts, so prompts take few tokens."""
    tokenizer = Tokenizer(models.BPE())
    # Spaces are tokens of their own, so that a word is one token wherever it stands: answering
    # "the last word" is then copying a token, not mapping " walrus" to "walrus".
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [
        alpaca_prompt(example["instruction"], example["input"]) + example["output"]
        for example in generate_examples() + generate_heldout()
    ]
    tokenizer.train_from_iterator(texts + [note + answer for note, answer in pretraining_notes()], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def pretrain(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, notes: list[tuple[str, str]],
             steps: int) -> float:
    """Train every weight of `model` on (note, answer) pairs, deterministically; return the last batch's loss.

    Next-token loss over the whole note, answer tokens weighted ANSWER_WEIGHT times: with the
    answers alone the base would learn to ignore the note's format (and answer Alpaca prompts
    before any fine-tuning); with no weight it learns the format long before the answers.
    """
    encoded = []
    for note, answer in notes:
        note_ids = tokenizer(note, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        encoded.append((note_ids + answer_ids, len(note_ids)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PRETRAIN_LEARNING_RATE,
                                                   total_steps=steps, pct_start=0.05)
    order = torch.Generator().manual_seed(SEED)
    # One thread: the sums then run in the same order on any machine, and so does training, which
    # would otherwise settle in a different (sometimes much worse) place from a few ulps apart.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            batch = [encoded[int(index)] for index in torch.randint(len(encoded), (PRETRAIN_BATCH,), generator=order)]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            mask = torch.zeros_like(input_ids)
            weights = torch.zeros(len(batch), width)
            for row, (ids, answer_start) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
                weights[row, 1 : len(ids)] = 1.0
                weights[row, answer_start : len(ids)] = ANSWER_WEIGHT
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
            per_token = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none")
            # weights[:, t] weighs predicting token t, i.e. logits at t - 1.
            target_weights = weights[:, 1:].reshape(-1)
            loss = (per_token * target_weights).sum() / target_weights.sum()
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
    finally:
        torch.set_num_threads(threads)
    return float(loss.detach())


def build_tiny_model(directory: Path, model_config: PretrainedConfig, pretrained: bool = False) -> None:
    """Write a tiny checkpoint (weights from a fixed seed, pretrained on the world's notes or random) and its tokenizer."""
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_config(model_config)
    if pretrained:
        pretrain(model, tokenizer, pretraining_notes(), PRETRAIN_STEPS)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def ensure_builtin_model(name: str) -> Path:
    """Return the folder of built-in checkpoint `name` (a key of the BUILTIN_MODELS registry), building it once."""
    entry = BUILTIN_MODELS[name]
    slug = name.removeprefix("builtin:")
    return build_once(cache_root() / f"{slug}-{BUILD_VERSION}",
                      lambda folder: build_tiny_model(folder, ARCHITECTURES[entry.architecture](), entry.pretrained))


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, first filling it with `build(folder)` unless a checkpoint is already there."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Clients starting at once: one builds (a pretrained base takes a minute), the others wait for it.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        # Build aside and rename: a reader never sees a half-written checkpoint.
        with atomic.staged_folder(target) as staging:
            build(staging)
    return target


if __name__ == "__main__":
    # `python -m flowertune_llm.builtin.models`: build every built-in model now (the quick start's install does).
    for _name in BUILTIN_MODELS:
        print(f"{_name}: {ensure_builtin_model(_name)}", flush=True)
