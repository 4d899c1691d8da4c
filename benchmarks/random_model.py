"""Write a random-weight Llama checkpoint of a chosen size, for timing rounds without hub access.

Timings and memory depend on the architecture, not on the weights, so a model of the right shape
with random weights measures what a real one would. It gets the built-in tiny tokenizer (512
tokens), so the shipped data works with it.

    python benchmarks/random_model.py /tmp/midmodel                    # 413M parameters
    python benchmarks/random_model.py /tmp/wide --hidden 3200 --layers 26 --intermediate 8640
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from flowertune_llm.builtin.models import build_tokenizer, tiny_llama_config


def build_random_llama(folder: Path, hidden: int, layers: int, intermediate: int, heads: int) -> int:
    """Save the checkpoint and tokenizer to `folder`; return the number of parameters."""
    config = tiny_llama_config()
    config.hidden_size, config.num_hidden_layers = hidden, layers
    config.intermediate_size, config.num_attention_heads = intermediate, heads
    config.num_key_value_heads = heads
    config.head_dim = hidden // heads
    config.initializer_range = 0.02
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer().save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args(argv)
    for name in ("hidden", "layers", "intermediate", "heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.hidden % args.heads:
        parser.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    if args.folder.exists() and any(args.folder.iterdir()):
        parser.error(f"{args.folder} exists and is not empty; give a new folder")
    count = build_random_llama(args.folder, args.hidden, args.layers, args.intermediate, args.heads)
    print(f"wrote {args.folder}: random Llama, {count / 1e6:.0f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
