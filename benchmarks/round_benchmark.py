"""Measure federated rounds: where a round's time goes, tokens/s, bytes on the wire, peak memory.

Runs the real ServerApp and ClientApp in one process (Flower's simulation engine) for each variant
being compared, reads what the run recorded in metrics.json (clients time their own phases; the
server times aggregation and counts bytes), prints a table and writes JSON under
benchmarks/results/.

    python benchmarks/round_benchmark.py                      # base rebuilt vs disk cache vs kept
    python benchmarks/round_benchmark.py --compare transfer   # float32 vs bfloat16 adapters, 5 rounds
    python benchmarks/round_benchmark.py --compare padding    # padded vs padding-free vs packed batches
    python benchmarks/round_benchmark.py --compare modes      # all of a round's modes side by side
    python benchmarks/round_benchmark.py --run-config "model.quantization=8" --rounds 4

With one client per round (the `reuse` comparison) a round's time splits exactly into the client's
phases, aggregation, and the rest: Flower's messaging, scheduling and our checkpointing ("other").
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from flowertune_llm.shared.settings import ConfigError, parse_config
from flowertune_llm.tools.simulation import simulate

REPO_ROOT = Path(__file__).resolve().parent.parent
PHASES = ("base", "adapter_load", "data", "train", "serialize")
COMPARISONS = {
    # name: (variants {label: overrides}, clients, extra overrides)
    "reuse": ({"rebuilt each round": {"model.reuse-base": False},
               "rebuilt from disk cache": {"model.reuse-base": False, "model.quantized-cache-dir": "{scratch}/quantized"},
               "kept between rounds": {"model.reuse-base": True}},
              1, {"strategy.fraction-evaluate": 0.0, "strategy.min-train-nodes": 1,
                  "strategy.min-available-nodes": 1, "strategy.min-evaluate-nodes": 1}),
    "transfer": ({"float32": {"transfer.dtype": "float32"}, "float16": {"transfer.dtype": "float16"},
                  "bfloat16": {"transfer.dtype": "bfloat16"}}, 2, {}),
    # Batches: padded to the longest example, flattened without padding (same examples per step),
    # packed (more examples per step).
    "padding": ({"padded": {"train.padding-free": False, "train.packing": False},
                 "padding-free": {"train.padding-free": True, "train.packing": False},
                 "packed": {"train.padding-free": False, "train.packing": True}}, 2, {}),
    # Every mode of a round side by side, on the default job: how batches are formed, where the
    # held-out evaluation happens (its own messages, or in the next train message), how many
    # processes train each client (data-parallel workers; on a CPU they share its cores).
    "modes": ({"padded": {"train.padding-free": False},
               "padding-free (default)": {},
               "packed": {"train.padding-free": False, "train.packing": True},
               "evaluate on receipt": {"evaluate.on-receipt": True},
               "2 devices per client": {"train.num-devices": 2}}, 2, {}),
}


def _run(overrides: dict, clients: int, folder: Path) -> dict:
    run_config = get_fused_config_from_dir(REPO_ROOT, {**overrides, "results.dir": str(folder.parent),
                                                        "results.run-name": folder.name})
    parse_config(run_config)  # a bad --run-config stops here, before anything runs
    started = time.perf_counter()
    simulate(run_config, num_supernodes=clients)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["wall_s"] = round(time.perf_counter() - started, 2)
    return metrics


def _round_rows(metrics: dict) -> list[dict]:
    rows, previous = [], 0.0
    for record in metrics["rounds"]:
        row = {"round": record["round"], "round_s": round(record["elapsed_s"] - previous, 2)}
        previous = record["elapsed_s"]
        for phase in PHASES:
            row[phase] = record.get(f"time_{phase}_s", float("nan"))
        row["aggregate"] = record.get("time_aggregate_s", float("nan"))
        row["other"] = round(row["round_s"] - sum(row[p] for p in PHASES) - row["aggregate"], 2)
        row["slowest_train"] = record.get("time_train_slowest_s", float("nan"))
        # The `train` phase beyond its training loop (building the trainer, preparing the data), and
        # the clients' held-out loss (not in the round's phases: it follows the train messages).
        row["train_setup"] = round(row["train"] - record.get("time_train_loop_s", float("nan")), 4)
        row["eval_loss"] = record.get("eval_time_eval_loss_s", float("nan"))
        # What a round costs beyond its slowest client's training (evaluation, messaging, start-up).
        row["round_over_train"] = round(row["round_s"] / row["slowest_train"], 2) if row["slowest_train"] else float("nan")
        row["tokens_per_s"] = record.get("train_tokens_per_s", float("nan"))
        row["bytes_down"], row["bytes_up"] = record.get("bytes_down", 0), record.get("bytes_up", 0)
        row["peak_rss_mb"] = record.get("peak_rss_mb", float("nan"))
        rows.append(row)
    return rows


def _print_rounds(label: str, rows: list[dict]) -> None:
    print(f"\n{label}")
    header = ["round", "round_s", *PHASES, "aggregate", "other", "slowest_train", "round_over_train", "train_setup",
              "eval_loss", "tokens_per_s", "bytes_down", "bytes_up", "peak_rss_mb"]
    print(" | ".join(f"{h:>12}" for h in header))
    for row in rows:
        print(" | ".join(f"{row[h]:>12.2f}" if isinstance(row[h], float) else f"{row[h]:>12}" for h in header))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="reuse")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (reuse: 3, transfer: 5)")
    parser.add_argument("--run-config", default="", help='extra settings, as for flwr run: "key=value ..."')
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 2:
        parser.error(f"--rounds must be >= 2 (round 1 builds the base in every variant), got {args.rounds}")
    variants, clients, fixed = COMPARISONS[args.compare]
    rounds = args.rounds or (3 if args.compare == "reuse" else 5)
    try:
        extra = parse_config_args([args.run_config]) if args.run_config else {}
        parse_config(get_fused_config_from_dir(REPO_ROOT, {**fixed, **extra}))
    except (ConfigError, ValueError) as error:
        parser.error(f"--run-config: {error}")

    report = {"comparison": args.compare, "clients_per_round": clients, "rounds": rounds, "run_config": extra,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu_threads": torch.get_num_threads(),
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "date": time.strftime("%Y-%m-%d"), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="flowertune-bench-") as scratch:
        for index, (label, overrides) in enumerate(variants.items()):
            # "{scratch}" in a value: a folder that lives as long as this benchmark (the disk cache).
            concrete = {k: v.format(scratch=scratch) if isinstance(v, str) else v for k, v in overrides.items()}
            settings = {**fixed, **extra, **concrete, "num-server-rounds": rounds}
            metrics = _run(settings, clients, Path(scratch) / f"variant-{index}")
            rows = _round_rows(metrics)
            last = metrics["rounds"][-1]
            report["variants"][label] = {
                "overrides": overrides, "wall_s": metrics["wall_s"], "rounds": rows,
                "mean_round_s_after_first": statistics.mean(r["round_s"] for r in rows[1:]),
                "final_train_loss": last.get("train_loss"), "final_eval_loss": last.get("eval_loss"),
                "final_exact_match": last.get("eval_exact_match"),
                "mean_train_s": statistics.mean(r["train"] for r in rows),
                "mean_round_over_slowest_train_after_first": statistics.mean(r["round_over_train"] for r in rows[1:]),
                "mean_tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rows),
                "bytes_total": last.get("bytes_total"),
            }
            _print_rounds(f"{label} ({clients} client(s) per round, {metrics['wall_s']:.1f} s wall)", rows)

    print("\nSummary")
    for label, result in report["variants"].items():
        print(f"  {label:>20}: mean round (rounds 2+) {result['mean_round_s_after_first']:.2f} s | "
              f"train {result['mean_train_s']:.2f} s/round at {result['mean_tokens_per_s']:.0f} tokens/s | "
              f"final train loss {result['final_train_loss']} | final eval loss {result['final_eval_loss']} | "
              f"exact match {result['final_exact_match']} | "
              f"round / slowest client's training (rounds 2+) {result['mean_round_over_slowest_train_after_first']:.2f} | "
              f"{result['bytes_total'] / 1e6:.3f} MB in total")
    labels = list(report["variants"])
    first, last = report["variants"][labels[0]], report["variants"][labels[-1]]
    if args.compare == "reuse":
        ratio = first["mean_round_s_after_first"] / last["mean_round_s_after_first"]
        cached = report["variants"][labels[1]]["mean_round_s_after_first"]
        print(f"  rounds 2+ are {ratio:.2f}x faster with the base kept, "
              f"{first['mean_round_s_after_first'] / cached:.2f}x with the disk cache")
        report["speedup_rounds_after_first"] = {"kept": round(ratio, 3),
                                                "disk_cache": round(first["mean_round_s_after_first"] / cached, 3)}
    elif args.compare in ("padding", "modes"):
        for label in labels[1:]:
            speedup = report["variants"][label]["mean_tokens_per_s"] / first["mean_tokens_per_s"]
            print(f"  {label}: {speedup:.2f}x the tokens/s of {labels[0]}")
    else:
        print(f"  bytes: {labels[-1]} sends {last['bytes_total'] / first['bytes_total']:.3f}x of {labels[0]}")

    args.output.mkdir(parents=True, exist_ok=True)
    target = args.output / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.compare}.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
