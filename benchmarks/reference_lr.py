"""Measure training at the reference learning rates: entries moved per round, and what the wire costs.

Runs the app (in one process, `flowertune_llm.tools.simulation`) with the reference schedule, once per
transfer precision, saving the global adapter after every round, and prints per round the share
of lora_A and lora_B entries that changed and the train loss; then each precision's final adapter
against the float32 wire's (norm of the difference over norm of the total update).

    python benchmarks/reference_lr.py                       # tiny default, 4 rounds
    python benchmarks/reference_lr.py --rounds 5 --run-config "model.quantization=8"
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from safetensors.torch import load_file

from flowertune_llm.client.model import build_adapter_skeleton
from flowertune_llm.shared.adapters import adapter_state
from flowertune_llm.shared.settings import parse_config
from flowertune_llm.tools.simulation import simulate

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE = {"train.learning-rate-max": 5e-5, "train.learning-rate-min": 1e-6}


def moved_share(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], kind: str) -> float:
    """Return the share of `kind` (lora_A / lora_B) entries that differ between two adapters."""
    names = [name for name in before if kind in name]
    return sum(int((after[n] != before[n]).sum()) for n in names) / sum(before[n].numel() for n in names)


def relative_distance(a: dict, b: dict, origin: dict) -> float:
    """Return ||a - b|| / ||b - origin|| over all tensors."""
    difference = sum(float(((a[n] - b[n]) ** 2).sum()) for n in origin) ** 0.5
    update = sum(float(((b[n] - origin[n]) ** 2).sum()) for n in origin) ** 0.5
    return difference / update


def run(folder: Path, overrides: dict, transfer: str, rounds: int) -> tuple[list[dict], list[dict], float]:
    """Run once; return the global adapters (initial, then after each round), the round records, seconds."""
    run_config = get_fused_config_from_dir(REPO_ROOT, {
        **overrides, **REFERENCE, "num-server-rounds": rounds, "train.save-every-round": 1,
        "transfer.dtype": transfer, "results.dir": str(folder), "results.run-name": transfer,
    })
    started = time.perf_counter()
    simulate(run_config)
    seconds = time.perf_counter() - started
    config = parse_config(run_config)
    initial = adapter_state(build_adapter_skeleton(config.model, seed=config.train.seed))
    saved = [load_file(folder / transfer / f"adapter-round-{r:03d}" / "adapter_model.safetensors")
             for r in range(1, rounds + 1)]
    records = json.loads((folder / transfer / "metrics.json").read_text())["rounds"]
    return [initial, *[{n: adapter[n] for n in initial} for adapter in saved]], records, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--run-config", default="", help="extra run config, as for flwr run --run-config")
    parser.add_argument("--transfer", nargs="+", default=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    overrides = parse_config_args([args.run_config]) if args.run_config else {}
    results = {}
    with tempfile.TemporaryDirectory(prefix="reference-lr-") as folder:
        for transfer in args.transfer:
            adapters, records, seconds = run(Path(folder), overrides, transfer, args.rounds)
            results[transfer] = adapters
            print(f"transfer.dtype={transfer} ({seconds:.1f} s)")
            for r, record in enumerate(records, start=1):
                print(f"  round {r}: lr {record['learning_rate']:.2e} | lora_A moved "
                      f"{moved_share(adapters[r - 1], adapters[r], 'lora_A'):.1%} | lora_B moved "
                      f"{moved_share(adapters[r - 1], adapters[r], 'lora_B'):.1%} | train loss {record['train_loss']:.4f}")
    if "float32" in results:
        reference = results["float32"]
        for transfer, adapters in results.items():
            if transfer != "float32":
                distance = relative_distance(adapters[-1], reference[-1], reference[0])
                print(f"final adapter, {transfer} wire vs float32 wire: {distance:.2%} of the total update")


if __name__ == "__main__":
    main()
