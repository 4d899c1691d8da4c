"""Peak memory of one client's training, per setting, beside the FlowerTune reference's figures.

    flowertune memory-report                         # CPU: the tiny default
    flowertune memory-report --setting openllama-7b-8bit openllama-7b-4bit \\
        openllama-3b-8bit openllama-3b-4bit                        # GPU: the reference's four
    flowertune memory-report --setting cpu-mid --variants reference-stack fused-loss app

For each setting (a preset name, a preset file, `tiny` = the app's defaults, or the CPU-sized
random models `cpu-mid` and `cpu-16x512` of BUILTIN_SETTINGS) it builds one client's training
exactly as a client does (the same quantized loading, k-bit preparation, LoRA and trl SFT trainer)
and runs `--steps` real optimizer steps; then it reports the peak memory of that process: on an
NVIDIA GPU the peak while loading, then (peaks reset) the peak while training, allocated and
reserved, and what NVML reports for the whole process (CUDA context included: what nvidia-smi
and the reference's table show; needs the optional `nvidia-ml-py`); peak resident memory (RSS) on
a CPU. Every measurement runs in a fresh process that sees one GPU, so one never inherits
another's peak and trl never sees several GPUs.

No weights are needed: for the reference models it builds a checkpoint of the exact architecture
(the public config values of OpenLLaMA 3B v2 / 7B v2 and Llama-2-7B) with random weights, once,
into the model cache (`FLOWERTUNE_CACHE`). Memory does not depend on weight values. Every training
example is `train.seq-length` random token ids (the worst case: no example shorter than the limit),
the last three quarters of each the completion the loss is taken on.

Variants, all of which train the same adapter (same loss, same gradients):
  reference-stack  the full (batch, seq, vocab) logits, upcast to fp32 for the loss, and peft's fp32
                   copies of the frozen embedding and LM head: what the reference's stack did
  fused-loss       trl 1.16's fused LM head (loss in tiles, no full logits); fp32 embedding and head
  app              fused loss and the frozen embedding and LM head kept in bf16: what the app runs
  chunked-loss     app with `train.loss-chunk-tokens=1024`: the loss from 1024 tokens' logits at a
                   time, recomputed in the backward pass (the same gradients as reference-stack)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULT_PREFIX = "MEMORY-REPORT-RESULT "
VARIANTS = ("reference-stack", "fused-loss", "app", "chunked-loss")
CHUNK_TOKENS = 1024  # the chunked-loss variant's train.loss-chunk-tokens, unless one is configured
# The reference's "VRAM consumption" table (examples/flowertune-llm/README.md): per client, GB.
REFERENCE_VRAM_GB = {
    "openllama-7b-8bit": 22.00,
    "openllama-7b-4bit": 16.50,
    "openllama-3b-8bit": 13.50,
    "openllama-3b-4bit": 10.60,
}
# Column titles in the reference's layout.
REFERENCE_TITLES = {
    "openllama-7b-8bit": "7-billion (8-bit)",
    "openllama-7b-4bit": "7-billion (4-bit)",
    "openllama-3b-8bit": "3-billion (8-bit)",
    "openllama-3b-4bit": "3-billion (4-bit)",
}
# Settings that are not presets: run-config overrides of the app's defaults.
BUILTIN_SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # Big enough vocabulary and width for the variants to differ measurably on a CPU, small enough
    # for a few steps in minutes there: 141M parameters, the reference's LoRA and checkpointing.
    "cpu-mid": {
        "model.name": "random:llama-mid",
        "model.gradient-checkpointing": True,
        "model.lora.r": 32,
        "model.lora.alpha": 64,
        "model.lora.target-modules": "peft-default",
        "train.seq-length": 256,
        "train.batch-size": 4,
    },
    # The reference's batch and sequence length (8192 tokens a step) and vocabulary on a narrow,
    # 4-layer Llama (45M parameters): the loss's share of memory at the reference's token count.
    "cpu-16x512": {
        "model.name": "random:llama-narrow",
        "model.gradient-checkpointing": True,
        "model.lora.r": 32,
        "model.lora.alpha": 64,
        "model.lora.target-modules": "peft-default",
        "train.seq-length": 512,
        "train.batch-size": 16,
    },
}
RANDOM_BUILD_VERSION = "v1"


def architecture(name: str):
    """Return the model config of a model name the report builds with random weights, else None."""
    from transformers import LlamaConfig

    llama_7b = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, bos_token_id=1, eos_token_id=2,
                    tie_word_embeddings=False, hidden_act="silu")
    configs = {
        # Public config.json values of each checkpoint.
        "openlm-research/open_llama_3b_v2": dict(
            hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, hidden_act="silu"),
        "openlm-research/open_llama_7b_v2": dict(
            **llama_7b, max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=0),
        "meta-llama/Llama-2-7b-hf": dict(**llama_7b, max_position_embeddings=4096, rms_norm_eps=1e-5),
        "random:llama-mid": dict(
            hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
        "random:llama-narrow": dict(
            hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
    }
    return LlamaConfig(**configs[name]) if name in configs else None


def ensure_random_checkpoint(name: str) -> Path:
    """Return a cached checkpoint of `name`'s architecture with random bf16 weights, building it once.

    Built on the GPU where there is one (initialising 7B parameters on a CPU takes minutes). Its
    tokenizer is the tiny model's: the report feeds token ids, and only the padding id is read.
    """
    from transformers import AutoModelForCausalLM

    from flowertune_llm.builtin.models import build_once, build_tokenizer, cache_root

    def build(folder: Path) -> None:
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(architecture(name), dtype=torch.bfloat16)
        model.save_pretrained(folder, safe_serialization=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # leave the GPU to the measuring processes
        build_tokenizer().save_pretrained(folder)

    slug = name.replace("/", "--").replace(":", "-")
    return build_once(cache_root() / f"random-{slug}-{RANDOM_BUILD_VERSION}", build)


def setting_run_config(setting: str, extra: dict[str, Any], app: Path = Path(".")) -> dict[str, Any]:
    """Return the flat run config of a setting: a built-in name, a preset name (in `app`/presets) or a preset file.

    `app` is the Flower App folder whose pyproject.toml holds the defaults: the settings are the
    user's app, not the installed package's source tree.
    """
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    if setting in BUILTIN_SETTINGS:
        overrides = dict(BUILTIN_SETTINGS[setting])
    else:
        presets = app / "presets"
        path = Path(setting) if setting.endswith(".toml") else presets / f"{setting}.toml"
        if not path.is_file():
            known = sorted([*BUILTIN_SETTINGS, *(p.stem for p in presets.glob("*.toml"))])
            raise ValueError(f"no setting '{setting}': give a preset file or one of " + ", ".join(known))
        overrides = parse_config_args([str(path)])
    return get_fused_config_from_dir(app, {**overrides, **extra})


def _rss_mb() -> float:
    """Return this process's current resident memory in MB (Linux), or NaN elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return kib / 1024
    except (OSError, StopIteration):
        return float("nan")


def _peak_rss_mb() -> float:
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20


def full_logits_loss(outputs, labels, num_items_in_batch=None):
    """Return the causal-LM loss from the full logits, upcast to fp32 (transformers' model loss)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = outputs.logits
    return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)


def random_training_data(vocab_size: int, seq_length: int, examples: int, seed: int):
    """Return `examples` pre-tokenized examples of `seq_length` random ids, the last 3/4 as completion."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (examples, seq_length), generator=generator).tolist()
    prompt_length = seq_length // 4
    mask = [0] * prompt_length + [1] * (seq_length - prompt_length)
    return Dataset.from_dict({"input_ids": ids, "completion_mask": [mask] * examples})


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one client's training for `spec`, train `steps` steps, return its memory (this process)."""
    from flowertune_llm.client.model import build_peft_model, load_tokenizer
    from flowertune_llm.client.training import train_adapter
    from flowertune_llm.shared.settings import parse_config

    on_gpu = torch.cuda.is_available()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if on_gpu else "cpu",
                              "rss_after_imports_mb": _rss_mb()}
    config = parse_config(spec["run_config"])
    variant = spec["variant"]
    torch.manual_seed(config.train.seed)  # the same LoRA initialisation in every variant's process
    started = time.perf_counter()
    model = build_peft_model(config.model, upcast_embeddings=variant in ("reference-stack", "fused-loss"))
    result["load_s"] = time.perf_counter() - started
    if on_gpu:
        # Loading has its own spike (bf16 shards before packing); training's peak is measured apart.
        result["gpu_after_load_mb"] = torch.cuda.memory_allocated() / 2**20
        result["peak_gpu_load_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_load_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        torch.cuda.reset_peak_memory_stats()
    result["rss_after_load_mb"] = _rss_mb()
    train = config.train
    if variant == "chunked-loss":
        train.loss_chunk_tokens = train.loss_chunk_tokens or CHUNK_TOKENS
    elif variant in ("reference-stack", "fused-loss"):
        train.loss_chunk_tokens = 0
    examples = spec["steps"] * train.batch_size * train.gradient_accumulation_steps
    data = random_training_data(model.config.vocab_size, train.seq_length, examples, seed=train.seed)
    train.max_steps = spec["steps"]
    started = time.perf_counter()
    outcome = train_adapter(
        model, load_tokenizer(config.model), data, train, learning_rate=train.learning_rate_max, seed=train.seed,
        compute_loss_func=full_logits_loss if variant == "reference-stack" else None,
    )
    result["train_s"] = time.perf_counter() - started
    result["train_loss"] = outcome.loss
    result["tokens"] = outcome.tokens
    result["peak_rss_mb"] = _peak_rss_mb()
    if on_gpu:
        result["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        free, total = torch.cuda.mem_get_info()
        result["gpu_device_used_mb"] = (total - free) / 2**20  # the whole GPU, every process on it
        # The caching allocator still holds the training peak here, so this is that peak plus the context.
        process_mb = gpu_process_memory_mb(os.getpid())
        if process_mb is not None:
            result["gpu_process_nvml_mb"] = process_mb
    result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def gpu_process_memory_mb(pid: int) -> float | None:
    """Return the GPU memory NVML counts for process `pid` (all GPUs), or None without nvidia-ml-py or a match.

    In a container NVML may list host PIDs, which then match nothing: None, not 0.
    """
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        used = [process.usedGpuMemory
                for index in range(pynvml.nvmlDeviceGetCount())
                for process in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(index))
                if process.pid == pid and process.usedGpuMemory is not None]
    finally:
        pynvml.nvmlShutdown()
    return sum(used) / 2**20 if used else None


def run_measurement(run_config: dict[str, Any], variant: str, steps: int) -> dict[str, Any]:
    """Measure one setting and variant in a fresh Python process (seeing one GPU) and return what it reported."""
    from flowertune_llm.shared.devices import one_gpu_environment, visible_gpus

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({"run_config": run_config, "variant": variant, "steps": steps}, handle)
    gpus = visible_gpus()
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "flowertune_llm.tools.memory_report", "--measure", handle.name],
            capture_output=True, text=True, check=False,
            # trl refuses to train with several GPUs visible; the first one is measured.
            env=one_gpu_environment(os.environ, gpus[0] if gpus else None),
        )
    finally:
        os.unlink(handle.name)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"the measurement process failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


@dataclass
class Measurement:
    """One setting measured in one variant."""

    setting: str
    variant: str
    figures: dict[str, Any]

    @property
    def peak_gb(self) -> float:
        """Return the compared figure in GB: NVML's process figure, else the larger reserved peak, else peak RSS."""
        figures = self.figures
        if "gpu_process_nvml_mb" in figures:
            return figures["gpu_process_nvml_mb"] / 1024
        if "peak_gpu_reserved_mb" in figures:
            return max(figures["peak_gpu_reserved_mb"], figures.get("peak_gpu_load_reserved_mb", 0.0)) / 1024
        return figures["peak_rss_mb"] / 1024


def table(measurements: list[Measurement], settings: list[str], variants: list[str]) -> str:
    """Return the reference's table layout: one column per setting, the reference's row first."""
    on_gpu = any("peak_gpu_reserved_mb" in m.figures for m in measurements)
    nvml = all("gpu_process_nvml_mb" in m.figures for m in measurements)
    unit = "GPU memory of the process (NVML)" if nvml else "peak GPU memory (reserved)" if on_gpu else "peak RSS, CPU"
    header = ["Models", *(REFERENCE_TITLES.get(s, s) for s in settings)]
    rows = [["VRAM (reference)", *(f"~{REFERENCE_VRAM_GB[s]:.2f} GB" if s in REFERENCE_VRAM_GB else "–"
                                   for s in settings)]]
    by_key = {(m.setting, m.variant): m for m in measurements}
    for variant in variants:
        rows.append([f"{unit}, {variant}", *(f"{by_key[(s, variant)].peak_gb:.2f} GB" for s in settings)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(cell.center(width) for cell, width in zip(cells, widths)) + " |"

    divider = "| " + " | ".join(":" + "-" * (w - 2) + ":" for w in widths) + " |"
    return "\n".join([render(header), divider, *(render(row) for row in rows)])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowertune memory-report",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", nargs="+", default=None,
                        help="preset names or files, 'tiny', 'cpu-mid' or 'cpu-16x512' (default: the reference's four "
                             "on a GPU, 'tiny' on a CPU)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["app"],
                        help="what to measure (see above); default: app")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per measurement")
    parser.add_argument("--run-config", default="", help='overrides for every setting: "key=value ..."')
    parser.add_argument("--app", type=Path, default=Path("."),
                        help="the Flower App folder (its pyproject.toml and presets/); default: the current folder")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Check every argument and setting first, then measure each setting and variant and print the table."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.measure is not None:  # the child process of run_measurement
        result = measure(json.loads(args.measure.read_text()))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    from flwr.common.config import parse_config_args

    from flowertune_llm.shared.settings import ConfigError, parse_config

    on_gpu = torch.cuda.is_available()
    settings = args.setting or (list(REFERENCE_VRAM_GB) if on_gpu else ["tiny"])
    try:
        extra = parse_config_args([args.run_config]) if args.run_config else {}
        if not (args.app / "pyproject.toml").is_file():
            raise ValueError(f"--app {args.app}: no pyproject.toml there; give the Flower App folder")
        run_configs = {s: setting_run_config(s, extra, args.app) for s in settings}
        for run_config in run_configs.values():
            parse_config(run_config)
    except (ConfigError, ValueError) as error:
        parser.error(str(error))

    measurements = []
    for setting, run_config in run_configs.items():
        name = run_config["model.name"]
        if architecture(name) is not None:
            print(f"{setting}: random-weight checkpoint of {name}'s architecture ...", flush=True)
            run_config = {**run_config, "model.name": str(ensure_random_checkpoint(name))}
        for variant in args.variants:
            figures = run_measurement(run_config, variant, args.steps)
            measurements.append(Measurement(setting, variant, figures))
            shown = {k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}
            print(f"{setting} [{variant}]: {shown}", flush=True)

    device = measurements[0].figures["device"]
    print(f"\nPeak memory of one client, {args.steps} training steps, on {device}:\n")
    print(table(measurements, settings, args.variants))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "device": device, "measurements": [
            {"setting": m.setting, "variant": m.variant, **m.figures} for m in measurements]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
