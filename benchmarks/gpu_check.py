"""Everything GPU-specific, checked in one short run: what the first GPU machine has to run.

    bash benchmarks/gpu_check.sh                 # a GPU machine, no model hub needed (~8 minutes on one H200)
    bash benchmarks/gpu_check.sh --dry-run       # CPU, tiny model: the same steps at toy size (the tests run it)

Each step runs in a process of its own, under its own timeout and within a total budget, and the
run goes on past a failed step. Steps print `GPU-CHECK <step> key=value` lines; the summary JSON
(every step's figures, status and seconds) goes to `--output` (default: $OUT/gpu-check.json where
$OUT is set, else benchmarks/results/gpu-check-<time>.json). Model steps use random-weight
checkpoints of the OpenLLaMA 3B v2 / 7B v2 architectures built locally (memory_report.py), and
one quantized-base cache, so a base is quantized once per bit width.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "GPU-CHECK-RESULT "
OPENLLAMA_3B = "openlm-research/open_llama_3b_v2"
OPENLLAMA_7B = "openlm-research/open_llama_7b_v2"


def report(step: str, **figures: Any) -> None:
    """Print one `GPU-CHECK <step> key=value ...` line."""
    print(f"GPU-CHECK {step} " + " ".join(f"{key}={value}" for key, value in figures.items()), flush=True)


def _model_folder(context: dict[str, Any], name: str) -> str:
    """Return the checkpoint a step trains: the random-weight `name` on a GPU, the tiny model in a dry run."""
    from flowertune_llm.client.model import resolve_model_path
    from flowertune_llm.tools.memory_report import ensure_random_checkpoint

    if context["dry_run"]:
        return resolve_model_path("builtin:tiny-llama")
    return str(ensure_random_checkpoint(name))


def _settings(context: dict[str, Any], bits: int, **overrides: Any):
    """Return the app's default config for the 3B checkpoint (tiny in a dry run) in `bits`, with overrides."""
    from flwr.common.config import get_fused_config_from_dir

    from flowertune_llm.shared.settings import parse_config

    run_config = get_fused_config_from_dir(REPO_ROOT, {
        "model.name": _model_folder(context, OPENLLAMA_3B), "model.quantization": bits,
        "model.quantized-cache-dir": context["cache"], **overrides,
    })
    return parse_config(run_config)


# --- The steps: each returns its figures; an exception marks it failed --------------------------


def step_environment(context: dict[str, Any]) -> dict[str, Any]:
    """Versions, the GPU, its bf16 support, the one-GPU and bf16 checks the clients run."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from flowertune_llm.shared.devices import check_bf16, check_one_gpu, training_device

    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "flwr", "ray", "triton",
                    "nvidia-ml-py"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    device = training_device()
    figures: dict[str, Any] = {
        "versions": versions, "cuda_available": torch.cuda.is_available(), "cuda_runtime": torch.version.cuda,
        "gpu_count": torch.cuda.device_count(), "device": device.describe(),
        "capability": ".".join(map(str, device.capability)) if device.capability else None,
        "bf16_native": bool(device.capability and device.capability[0] >= 8),
    }
    check_one_gpu()
    check_bf16(device)
    if not context["dry_run"] and not device.on_gpu:
        raise RuntimeError("no CUDA GPU visible: every other step would measure the CPU")
    return figures


def step_bitsandbytes(context: dict[str, Any]) -> dict[str, Any]:
    """4-bit NF4 quantize-dequantize and an 8-bit layer's forward on the training device, errors bounded."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    device = context["device"]
    torch.manual_seed(0)
    weight = torch.randn(256, 256, dtype=torch.bfloat16, device=device)
    packed, state = F.quantize_4bit(weight, quant_type="nf4")
    nf4_error = ((F.dequantize_4bit(packed, state) - weight).abs().mean() / weight.abs().mean()).item()
    linear = torch.nn.Linear(256, 256, bias=False, dtype=torch.float16)
    layer = bnb.nn.Linear8bitLt(256, 256, bias=False, has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to(device)
    inputs = torch.randn(4, 256, dtype=torch.float16, device=device)
    expected = inputs.float() @ linear.weight.float().T.to(device)
    int8_error = ((layer(inputs).float() - expected).abs().mean() / expected.abs().mean()).item()
    figures = {"device": device, "nf4_relative_error": round(nf4_error, 4), "int8_relative_error": round(int8_error, 4)}
    # NF4 keeps ~1 digit per weight (about 10% mean error); LLM.int8() about 1%.
    if not (nf4_error < 0.2 and int8_error < 0.05):
        raise RuntimeError(f"bitsandbytes round trip off: {figures}")
    return figures


def step_fused_loss(context: dict[str, Any]) -> dict[str, Any]:
    """Whether trl's fused loss (Triton kernels on CUDA) compiles and runs; which loss the clients pick."""
    from flowertune_llm.shared import devices

    problem = devices.fused_loss_problem(context["device"])
    settings = devices.loss_settings(_settings(context, 4).train, devices.training_device())
    return {"device": context["device"], "fused_loss_runs": problem is None, "problem": problem,
            "loss_chunk_tokens_chosen": settings.loss_chunk_tokens}


def step_ray_actors(context: dict[str, Any]) -> dict[str, Any]:
    """Ray actors asking 0, 0.5 and 0.5 GPU: what each sees, and the memory cap of a half share."""
    import ray

    # A dry run declares a GPU that is not there: Ray's bookkeeping needs none.
    ray.init(num_cpus=4, num_gpus=None if not context["dry_run"] else 1, include_dashboard=False,
             log_to_driver=False)

    @ray.remote
    def seen() -> dict[str, Any]:
        import os

        import torch

        from flowertune_llm.shared.devices import cap_memory_to_ray_share, ray_gpu_share

        return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "share": ray_gpu_share(),
                "cuda": torch.cuda.is_available(), "memory_cap": cap_memory_to_ray_share()}

    try:
        actors = {share: ray.get(seen.options(num_gpus=share).remote()) for share in (0, 0.5)}
        both = ray.get([seen.options(num_gpus=0.5).remote() for _ in range(2)])
    finally:
        ray.shutdown()
    figures = {"no_gpu": actors[0], "half_gpu": actors[0.5], "two_halves_same_gpu":
               both[0]["CUDA_VISIBLE_DEVICES"] == both[1]["CUDA_VISIBLE_DEVICES"]}
    ok = actors[0]["CUDA_VISIBLE_DEVICES"] == "" and not actors[0]["cuda"] and actors[0.5]["share"] == 0.5
    if not context["dry_run"]:
        ok = ok and actors[0.5]["cuda"] and actors[0.5]["memory_cap"] == 0.5
    if not ok:
        raise RuntimeError(f"Ray actors do not see what they should: {figures}")
    return figures


def step_device_tests(context: dict[str, Any]) -> dict[str, Any]:
    """The test suite's device-aware tests (models fed on their own device), on this machine."""
    files = ["tests/test_devices.py", "tests/test_quantized_cache.py", "tests/test_kept_model.py",
             # LoRA weights and optimizer state float32 inside trl's trainer, compute bf16: on CUDA here.
             "tests/test_numerics.py::test_lora_weights_and_optimizer_state_are_float32_in_the_trainer_and_compute_in_the_compute_dtype",
             "tests/test_chunked_loss.py::test_chunked_loss_matches_the_full_logits_loss"]
    # In a dry run (itself run by the tests) collecting them is enough: running them would recurse.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
               *(["--collect-only"] if context["dry_run"] else ["-k", "not each_round_of_a_cpu_run"])]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    summary = (completed.stdout.strip().splitlines() or [""])[-1]
    if completed.returncode != 0:
        raise RuntimeError(f"pytest exited {completed.returncode}: {summary}\n{completed.stdout[-3000:]}")
    return {"summary": summary}


def step_quantized_cache(context: dict[str, Any]) -> dict[str, Any]:
    """The 3B random checkpoint in 4 and 8 bits: quantize and save, reload from the cache, same logits."""
    import torch

    from flowertune_llm.client.kept_model import release_memory
    from flowertune_llm.client.model import load_quantized_base
    from flowertune_llm.client.quantized_cache import cache_entry

    figures: dict[str, Any] = {}
    for bits in (4, 8):
        settings = _settings(context, bits).model
        entry = cache_entry(settings, settings.name)
        tokens = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
        logits = []
        for attempt in ("fresh", "cached"):
            started = time.perf_counter()
            model = load_quantized_base(settings)
            figures[f"{bits}bit_{attempt}_load_s"] = round(time.perf_counter() - started, 1)
            with torch.no_grad():
                logits.append(model(tokens.to(model.device)).logits.float().cpu())
            del model
            release_memory()
        figures[f"{bits}bit_equal"] = bool(torch.equal(*logits))
        figures[f"{bits}bit_entry"] = entry.name if entry else None
    if not (figures["4bit_equal"] and figures["8bit_equal"]):
        raise RuntimeError(f"a cached base computes differently from a fresh one: {figures}")
    return figures


def _memory_report(context: dict[str, Any], settings: list[str], variants: list[str], steps: int) -> dict[str, Any]:
    """Run the memory report (one fresh process per measurement) and return its JSON."""
    from flowertune_llm.tools import memory_report

    output = Path(context["workdir"]) / f"memory-{'-'.join(settings)}-{'-'.join(variants)}.json"
    overrides = f"model.quantized-cache-dir='{context['cache']}'"
    if context["dry_run"]:
        settings = ["tiny"]
        overrides += " train.seq-length=64 train.batch-size=2"
    code = memory_report.main(["--setting", *settings, "--variants", *variants, "--steps", str(steps),
                               "--run-config", overrides, "--json", str(output)])
    if code != 0:
        raise RuntimeError(f"memory report exited {code}")
    return json.loads(output.read_text())


def _row(measurement: dict[str, Any]) -> dict[str, Any]:
    """Return a measurement's figures that the summary keeps, rounded."""
    keys = ("setting", "variant", "device", "load_s", "train_s", "train_loss", "tokens", "peak_gpu_load_allocated_mb",
            "peak_gpu_load_reserved_mb", "gpu_after_load_mb", "peak_gpu_allocated_mb", "peak_gpu_reserved_mb",
            "gpu_process_nvml_mb", "gpu_device_used_mb", "peak_rss_mb")
    return {key: round(measurement[key], 2) if isinstance(measurement.get(key), float) else measurement.get(key)
            for key in keys if key in measurement}


def step_training(context: dict[str, Any]) -> dict[str, Any]:
    """3B 4-bit at the reference shape (16 x 512): default (fused) loss, chunked loss, full logits."""
    steps = 2
    report_json = _memory_report(context, ["openllama-3b-4bit"], ["app", "chunked-loss", "reference-stack"], steps)
    rows = [_row(m) for m in report_json["measurements"]]
    for row in rows:
        row["s_per_step"] = round(row["train_s"] / steps, 2)
    return {"steps": steps, "variants": rows}


def step_kept_model(context: dict[str, Any]) -> dict[str, Any]:
    """Three rounds on the kept 3B 4-bit model: allocated memory after each stays flat; replacing it frees it."""
    import dataclasses

    import torch

    from flowertune_llm.client import kept_model
    from flowertune_llm.client.data import load_client_data
    from flowertune_llm.client.model import load_tokenizer
    from flowertune_llm.client.training import train_adapter

    config = _settings(context, 4, **{"train.seq-length": 128, "train.batch-size": 4, "train.max-steps": 2})
    data, _ = load_client_data(config.dataset, 0, 2)
    tokenizer = load_tokenizer(config.model)
    on_gpu = torch.cuda.is_available()
    after_round, lora_dtypes = [], set()
    for round_number in (1, 2, 3):
        model = kept_model.peft_model(config.model, reuse=True)
        train_adapter(model, tokenizer, data, config.train, learning_rate=5e-5, seed=round_number)
        lora_dtypes |= {str(p.dtype) for p in model.parameters() if p.requires_grad}
        del model
        after_round.append(round(torch.cuda.memory_allocated() / 2**20, 1) if on_gpu else 0.0)
    other = dataclasses.replace(config.model, lora=dataclasses.replace(config.model.lora, r=4))
    kept_model.peft_model(other, reuse=True)
    after_replacement = round(torch.cuda.memory_allocated() / 2**20, 1) if on_gpu else 0.0
    figures = {"allocated_after_round_mb": after_round, "allocated_after_replacement_mb": after_replacement,
               "lora_dtypes": sorted(lora_dtypes)}
    if lora_dtypes != {"torch.float32"}:
        raise RuntimeError(f"trainable LoRA weights are not float32 after training: {figures}")
    # Flat: the third round holds no more than the first (64 MB of slack for the allocator's rounding).
    if after_round[2] > after_round[0] + 64 or after_replacement > after_round[0] + 64:
        raise RuntimeError(f"memory grows across kept-model rounds or replacement: {figures}")
    return figures


def step_simulation(context: dict[str, Any]) -> dict[str, Any]:
    """A 3-round simulation, 4 nodes at 0.5 GPU each, on the random 3B: device and memory in metrics.json."""
    from flwr.common.config import get_fused_config_from_dir

    results = Path(context["workdir"]) / "simulation"
    num_gpus = 0.0 if context["dry_run"] else 0.5
    run_config = get_fused_config_from_dir(REPO_ROOT, {
        "num-server-rounds": 2 if context["dry_run"] else 3, "model.name": _model_folder(context, OPENLLAMA_3B),
        "model.quantized-cache-dir": context["cache"], "train.seq-length": 128, "train.batch-size": 4,
        "train.max-steps": 2, "train.learning-rate-max": 5e-5, "train.learning-rate-min": 1e-6,
        "strategy.fraction-evaluate": 0.0, "strategy.min-available-nodes": 4, "strategy.min-train-nodes": 4,
        "train.expect-gpu": "off" if context["dry_run"] else "stop", "train.save-every-round": 0,
        "results.dir": str(results), "results.run-name": "run",
    })
    config_file = Path(context["workdir"]) / "simulation-run-config.json"
    config_file.write_text(json.dumps(run_config))
    completed = subprocess.run([sys.executable, "-m", "flowertune_llm.tools.simulation", str(config_file), "4", str(num_gpus)],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    metrics = results / "run" / "metrics.json"
    if completed.returncode != 0 or not metrics.is_file():
        raise RuntimeError(f"simulation exited {completed.returncode}:\n{completed.stderr[-3000:]}")
    rounds = json.loads(metrics.read_text())["rounds"]
    keys = ("round", "device", "train_replies", "train_loss", "time_train_s", "peak_gpu_allocated_mb",
            "peak_gpu_reserved_mb", "peak_rss_mb")
    figures = {"rounds": [{key: r.get(key) for key in keys} for r in rounds]}
    expected = "cpu" if context["dry_run"] else "cuda"
    if [r.get("device") for r in rounds] != [expected] * len(rounds) or any(r.get("train_replies") != 4 for r in rounds):
        raise RuntimeError(f"expected every round trained on {expected} by 4 clients: {figures}")
    return figures


def step_multi_device(context: dict[str, Any]) -> dict[str, Any]:
    """One client on 2 GPUs (DDP over nccl, client/multi_device.py) against 1 GPU, same global batch: same figures."""
    import dataclasses

    import torch

    from flowertune_llm.client.data import load_client_data
    from flowertune_llm.client.kept_model import release_memory
    from flowertune_llm.client.model import build_adapter_skeleton, build_peft_model, load_tokenizer
    from flowertune_llm.client.multi_device import RoundJob, train_on_devices
    from flowertune_llm.client.training import train_adapter
    from flowertune_llm.shared.adapters import adapter_state, load_adapter_state

    if torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, {torch.cuda.device_count()} visible"}
    config = _settings(context, 4, **{"train.num-devices": 2, "train.batch-size": 4, "train.seq-length": 128,
                                      "train.max-steps": 2, "model.lora.dropout": 0.0})
    data, _ = load_client_data(config.dataset, 0, 2)
    received = adapter_state(build_adapter_skeleton(config.model, seed=7))
    started = time.perf_counter()
    two, outcome_two = train_on_devices(config, data, received, RoundJob(5e-5, seed=1234), timeout_s=300)
    two_s = time.perf_counter() - started
    started = time.perf_counter()
    model = build_peft_model(config.model)
    load_adapter_state(model, received)
    outcome_one = train_adapter(model, load_tokenizer(config.model), data,
                                dataclasses.replace(config.train, num_devices=1), 5e-5, 1234)
    one_s = time.perf_counter() - started
    one = adapter_state(model)
    del model
    release_memory()
    update_one = torch.cat([(one[k] - received[k]).flatten() for k in one])
    update_two = torch.cat([(two[k] - received[k]).flatten() for k in one])
    figures = {"two_gpu_s": round(two_s, 1), "one_gpu_s": round(one_s, 1), "tokens": [outcome_one.tokens, outcome_two.tokens],
               "loss": [round(outcome_one.loss, 4), round(outcome_two.loss, 4)],
               "relative_difference": round(((update_two - update_one).norm() / update_one.norm()).item(), 4)}
    # The CPU test's bound (tests/test_multi_device.py): same examples, bf16-level differences only.
    if outcome_one.tokens != outcome_two.tokens or figures["relative_difference"] > 0.1:
        raise RuntimeError(f"2 GPUs did not train what 1 GPU did with the same global batch: {figures}")
    return figures


def step_memory_report(context: dict[str, Any]) -> dict[str, Any]:
    """The reference's four settings beside its figures (3B 4-bit comes from the training step's `app` row)."""
    from flowertune_llm.tools.memory_report import REFERENCE_VRAM_GB

    if not context["dry_run"]:
        _model_folder(context, OPENLLAMA_7B)  # built once, into the model cache
    report_json = _memory_report(context, ["openllama-7b-8bit", "openllama-7b-4bit", "openllama-3b-8bit"], ["app"], 2)
    rows = [_row(m) for m in report_json["measurements"]]
    for row in rows:
        row["reference_gb"] = REFERENCE_VRAM_GB.get(row["setting"])
    return {"settings": rows}


STEPS: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], int]] = {
    # name: (function, timeout in seconds on a GPU); ordered by what matters most if the budget runs out.
    "environment": (step_environment, 60),
    "bitsandbytes": (step_bitsandbytes, 60),
    "fused-loss": (step_fused_loss, 90),
    "ray-actors": (step_ray_actors, 90),
    "device-tests": (step_device_tests, 240),
    "quantized-cache": (step_quantized_cache, 180),
    "training": (step_training, 180),
    "kept-model": (step_kept_model, 90),
    "simulation": (step_simulation, 180),
    # Skipped (and said so) with fewer than 2 GPUs.
    "multi-device": (step_multi_device, 240),
    "memory-report": (step_memory_report, 240),
}


def run_step(name: str, context: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run one step in a fresh process (its own session, killed whole on timeout); return its record."""
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--context", json.dumps(context)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the step's Ray workers and measuring children too
        stdout, stderr = process.communicate()
        status = "timeout"
    for line in stdout.splitlines():
        if line.startswith("GPU-CHECK "):
            print(line, flush=True)
    results = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    record: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - started, 1)}
    if results:
        record.update(json.loads(results[-1].removeprefix(RESULT_PREFIX)))
    if status == "ok" and "skipped" in record:
        # A step this machine cannot run (multi-device on fewer than 2 GPUs): not a failure.
        record.update(status="skipped", reason=record.pop("skipped"), applicable=False)
    if status != "ok":
        record["error_tail"] = (stderr or stdout)[-2500:]
    report(name, status=record["status"], seconds=record["seconds"], **({"reason": record["reason"].replace(" ", "-")}
                                                                       if "reason" in record else {}))
    return record


def _default_output() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu-check.json"
    return REPO_ROOT / "benchmarks" / "results" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}.json"


def main(argv: list[str] | None = None) -> int:
    """Run every step (or one, in a child process) and write the summary JSON; 1 if a step did not pass."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU and the tiny model: the same steps, toy sizes")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total seconds for all steps (default 480)")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), default=None, help="run these steps only")
    parser.add_argument("--output", type=Path, default=None, help="summary JSON (default: $OUT/gpu-check.json)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="checkpoints, cache and runs (default: a folder beside the output)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--context", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:  # a child: one step, its figures as the last line
        context = json.loads(args.context)
        figures = STEPS[args.step][0](context)
        report(args.step, **{k: v for k, v in figures.items() if not isinstance(v, (dict, list))})
        print(RESULT_PREFIX + json.dumps(figures), flush=True)
        return 0
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")

    output = args.output or _default_output()
    output.parent.mkdir(parents=True, exist_ok=True)
    workdir = (args.workdir or output.parent / "gpu-check-work").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Random checkpoints and the quantized cache live in the work folder, never in the app folder
    # (`flwr run` would bundle them); the hub is never asked.
    os.environ.setdefault("FLOWERTUNE_CACHE", str(workdir / "model-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    context = {"dry_run": args.dry_run, "workdir": str(workdir), "cache": str(workdir / "quantized-cache"),
               "device": "cpu" if args.dry_run else "cuda"}

    summary: dict[str, Any] = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "budget_s": args.budget_s, "steps": {}}
    started = time.monotonic()
    deadline = started + args.budget_s
    for name, (_, timeout_s) in STEPS.items():
        if args.only and name not in args.only:
            continue
        left = deadline - time.monotonic()
        if left < 10:
            summary["steps"][name] = {"status": "skipped", "reason": "the total budget is spent"}
            report(name, status="skipped")
            continue
        summary["steps"][name] = run_step(name, context, min(timeout_s, left) if not args.dry_run else left)
        output.write_text(json.dumps(summary, indent=2) + "\n")  # kept even if the run is cut short
    summary["seconds"] = round(time.monotonic() - started, 1)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    passed = all(step["status"] == "ok" or step.get("applicable") is False for step in summary["steps"].values())
    report("summary", passed=passed, seconds=summary["seconds"], output=output)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
