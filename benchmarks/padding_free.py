"""Non-padding tokens/s of padded, padding-free and packed training on long-tailed example lengths.

Instruction data such as Alpaca-GPT4 has mostly short responses and a long tail: a padded batch of
16 is as long as its longest example, so most of its tokens are padding. This generates such data
locally (lognormal response lengths, no download), trains the app's LoRA setup for a few steps in
each mode (`train.padding-free`, `train.packing`) and prints the tokens/s that are not padding,
measured after a warm-up step, each mode `--repeats` times, interleaved (the median is reported).

    python benchmarks/padding_free.py                       # tiny built-in model, 4-bit base
    python benchmarks/padding_free.py --wide                # also a wider random Llama (512 x 4 layers)
    python benchmarks/padding_free.py --bits 16 --steps 4

Writes benchmarks/results/<time>-padding-free.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from datasets import Dataset
from flwr.common.config import get_fused_config_from_dir
from transformers import TrainerCallback

from flowertune_llm.builtin.world import generate_examples
from flowertune_llm.client import training
from flowertune_llm.client.model import build_peft_model, load_tokenizer
from flowertune_llm.shared.prompts import alpaca_prompt
from flowertune_llm.shared.settings import parse_config

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
MODES = {
    "padded": {"train.padding-free": False, "train.packing": False},
    "padding-free": {"train.padding-free": True, "train.packing": False},
    # The same batches with transformers' own sdpa (one tokens x tokens mask), not the app's
    # per-example SDPA: shows what per_example_attention.py is for.
    "padding-free-sdpa-mask": {"train.padding-free": True, "train.packing": False},
    "packed": {"train.padding-free": False, "train.packing": True},
}


def long_tailed_examples(count: int, seed: int, median_tokens: float, sigma: float, tokens_per_word: float) -> Dataset:
    """Return `count` prompt/completion records whose completion lengths (in tokens) are lognormal."""
    rng = random.Random(seed)
    vocabulary = builtin_words()
    records = []
    for _ in range(count):
        # Alpaca-GPT4: a one-sentence instruction (median ~15 tokens), responses of a few tokens to pages.
        instruction = " ".join(rng.choices(vocabulary, k=max(2, round(rng.lognormvariate(math.log(15), 0.5) / tokens_per_word))))
        words = max(1, round(rng.lognormvariate(math.log(median_tokens), sigma) / tokens_per_word))
        records.append({"prompt": alpaca_prompt(instruction), "completion": " ".join(rng.choices(vocabulary, k=words))})
    return Dataset.from_list(records)


def builtin_words() -> list[str]:
    """Return the words of the built-in data, which the built-in tokenizer spends few tokens on."""
    return sorted({word for e in generate_examples() for word in (e["instruction"] + " " + e["output"]).split()})


def tokens_per_word(tokenizer) -> float:
    """Return how many tokens a word of random built-in words takes, on average."""
    words = random.Random(1).choices(builtin_words(), k=2000)
    return len(tokenizer(" ".join(words))["input_ids"]) / len(words)


class StepClock(TrainerCallback):
    """Records (wall seconds, process CPU seconds, non-padding tokens seen) at the end of every step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), time.process_time(), state.num_input_tokens_seen))


def measure(model_name: str, bits: int, mode: str, data: Dataset, args: argparse.Namespace) -> dict:
    """Train `args.steps` steps in `mode`; return tokens/s after the warm-up step and what a step held."""
    run_config = get_fused_config_from_dir(REPO_ROOT, {
        "model.name": model_name, "model.quantization": bits, "train.seq-length": args.seq_length,
        "train.batch-size": args.batch_size, "train.max-steps": args.steps, **MODES[mode],
    })
    config = parse_config(run_config)
    torch.manual_seed(0)
    model = build_peft_model(config.model)
    clock = StepClock()
    # As train_adapter does: the attention check and per-example SDPA for flattened batches.
    attention = nullcontext() if mode == "padding-free-sdpa-mask" else training.flattened_batches(model, config.train)
    with attention, tempfile.TemporaryDirectory(prefix="padding-free-bench-") as output_dir:
        trainer = training._trainer(model, load_tokenizer(config.model), config.train, 1e-4, 1, output_dir,
                                    train_data=data)
        trainer.add_callback(clock)
        trainer.train()
        rows = trainer.train_dataset
        per_row = statistics.mean(len(s) for s in rows["seq_lengths"]) if "seq_lengths" in rows.column_names else 1
    (start, cpu_start, tokens_before), (end, cpu_end, tokens_after) = clock.marks[0], clock.marks[-1]
    steps = len(clock.marks) - 1
    return {
        "mode": mode, "tokens_per_s": (tokens_after - tokens_before) / (end - start),
        # On a shared machine wall time includes waiting for the CPU; CPU time mostly does not.
        "tokens_per_cpu_s": (tokens_after - tokens_before) / (cpu_end - cpu_start),
        "seconds_per_step": (end - start) / steps, "measured_steps": steps,
        "non_padding_tokens_per_step": (tokens_after - tokens_before) / steps,
        "examples_per_step": args.batch_size * per_row,
    }


def benchmark(model_name: str, bits: int, data: Dataset, args: argparse.Namespace) -> dict:
    """Return every mode's runs and medians for one model, printing a line per run."""
    runs = []
    for repeat in range(args.repeats):
        for mode in MODES:
            result = measure(model_name, bits, mode, data, args)
            runs.append({**result, "repeat": repeat})
            print(f"  {model_name} {mode:>22}: {result['tokens_per_s']:8.0f} tok/s "
                  f"({result['tokens_per_cpu_s']:6.0f} per CPU-s)  "
                  f"{result['seconds_per_step']:6.2f} s/step  {result['examples_per_step']:5.1f} examples/step",
                  flush=True)
    medians = {mode: statistics.median(r["tokens_per_s"] for r in runs if r["mode"] == mode) for mode in MODES}
    cpu = {mode: statistics.median(r["tokens_per_cpu_s"] for r in runs if r["mode"] == mode) for mode in MODES}
    return {"model": model_name, "bits": bits, "runs": runs, "median_tokens_per_s": medians,
            "median_tokens_per_cpu_s": cpu,
            "speed-up_vs_padded": {mode: medians[mode] / medians["padded"] for mode in MODES},
            "cpu_speed-up_vs_padded": {mode: cpu[mode] / cpu["padded"] for mode in MODES}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8, 16))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=512, help="the tiny models hold 512 positions")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--examples", type=int, default=1024)
    # Alpaca-GPT4-like completions: median 100 tokens, mean ~150, 10% over ~320, 1% over ~800 (cut
    # at --seq-length with the prompt); the prompt is the Alpaca template (~40 tokens) + instruction.
    parser.add_argument("--median-tokens", type=float, default=100.0)
    parser.add_argument("--sigma", type=float, default=0.9)
    parser.add_argument("--wide", action="store_true", help="also a random Llama 512 wide, 4 layers")
    # One thread by default: on a shared machine a second thread often waits for a busy core.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    ratio = tokens_per_word(load_tokenizer(parse_config(get_fused_config_from_dir(REPO_ROOT, {})).model))
    data = long_tailed_examples(args.examples, 0, args.median_tokens, args.sigma, ratio)
    load_before = os.getloadavg()
    print(f"load average before: {load_before}; {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}")
    models = ["builtin:tiny-llama"]
    with tempfile.TemporaryDirectory(prefix="padding-free-wide-") as wide_folder:
        if args.wide:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from random_model import build_random_llama

            build_random_llama(Path(wide_folder), hidden=512, layers=4, intermediate=1408, heads=8)
            models.append(wide_folder)
        results = [benchmark(name, args.bits, data, args) for name in models]
    load_after = os.getloadavg()
    for result in results:
        name = "random Llama 512x4" if result["model"] != "builtin:tiny-llama" else result["model"]
        print(f"{name} ({result['bits']}-bit), batch {args.batch_size}, median of {args.repeats}:")
        for mode, value in result["median_tokens_per_s"].items():
            print(f"  {mode:>22}: {value:8.0f} non-padding tokens/s  x{result['speed-up_vs_padded'][mode]:.2f}"
                  f"   {result['median_tokens_per_cpu_s'][mode]:8.0f} per CPU-second"
                  f"  x{result['cpu_speed-up_vs_padded'][mode]:.2f}")
    print(f"load average after: {load_after}")
    for result in results:
        if result["model"] != "builtin:tiny-llama":
            result["model"] = "random Llama: hidden 512, 4 layers, intermediate 1408, 8 heads"
    record = {
        "benchmark": "padding-free", "machine": platform.platform(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": "cpu",
        "load_average_before": load_before, "load_average_after": load_after,
        "settings": {k: v for k, v in vars(args).items()}, "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-padding-free.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
