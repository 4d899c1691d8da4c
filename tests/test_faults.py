"""Faults in a real run: clients that raise or send malformed adapters, and server-side evaluation.

Six simulated clients per round: two train normally, one raises, and three reply with a NaN, a
wrong-shaped and an extra-key adapter. The run must complete, count each fault, and produce the
average of the two good updates, as if the bad ones had never been sent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowertune_llm import client_app
from flowertune_llm.client.model import build_adapter_skeleton
from flowertune_llm.shared.adapters import adapter_state, from_array_record, to_array_record
from flowertune_llm.shared.settings import parse_config
from flowertune_llm.tools.simulation import simulate

from conftest import default_run_config

# The one test here is a 6-client simulation.
pytestmark = pytest.mark.integration

NODES = 6


def _corrupt(reply: Message, fault: str) -> Message:
    state = from_array_record(reply.content["arrays"])
    name = next(iter(state))
    if fault == "nan":
        state[name] = torch.full_like(state[name], float("nan"))
    elif fault == "shape":
        state[name] = torch.zeros(state[name].shape[0] + 1, *state[name].shape[1:], dtype=state[name].dtype)
    elif fault == "extra-key":
        state["base_model.model.lm_head.weight"] = torch.zeros(4, dtype=state[name].dtype)
    reply.content["arrays"] = to_array_record(state, "bfloat16")
    return reply


def _faulty_train(record_dir: Path):
    """A train handler: partitions 0-1 train for real, 2 raises, 3-5 send malformed adapters."""
    faults = {2: "raise", 3: "nan", 4: "shape", 5: "extra-key"}

    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if faults.get(partition) == "raise":
            raise RuntimeError("simulated client crash")
        reply = client_app.train(msg, context)
        server_round = int(msg.content["config"]["server-round"])
        if partition in faults:
            return _corrupt(reply, faults[partition])
        # What it trained, and what it trained from (the global adapter as the bf16 wire delivered it).
        received = from_array_record(msg.content["arrays"])
        state = {k: v.float() for k, v in from_array_record(reply.content["arrays"]).items()}
        update = {k: state[k] - received[k].float() for k in state}
        save_file(update, record_dir / f"round{server_round}-node{partition}.safetensors",
                  metadata={"num-examples": str(reply.content["metrics"]["num-examples"])})
        return reply

    return train


def test_faulty_clients_are_counted_and_left_out_of_the_average(tmp_path):
    record_dir = tmp_path / "good-replies"
    record_dir.mkdir()
    run_config = default_run_config(**{
        "num-server-rounds": 2, "train.max-steps": 3, "train.save-every-round": 1,
        "strategy.fraction-evaluate": 0.0, "strategy.min-train-nodes": NODES,
        "strategy.min-available-nodes": NODES, "strategy.min-train-replies": 2,
        "evaluate.server-dataset": "builtin:tiny-instructions-heldout",
        "results.dir": str(tmp_path), "results.run-name": "run",
    })
    simulate(run_config, num_supernodes=NODES, train=_faulty_train(record_dir))

    folder = tmp_path / "run"
    rounds = json.loads((folder / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert (record["train_sampled"], record["train_failures"], record["train_rejected"]) == (NODES, 1, 3)
        assert record["train_replies"] == NODES - 1 and not record.get("kept_previous_adapter")
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["server_eval_loss"])
    assert rounds[1]["server_eval_loss"] < rounds[0]["server_eval_loss"]

    # Each saved global adapter is the previous one plus the example-weighted mean of the two good
    # replies' updates alone (to the bf16 wire's rounding of those updates).
    config = parse_config(run_config)
    previous = adapter_state(build_adapter_skeleton(config.model, seed=config.train.seed))
    for server_round in (1, 2):
        good = [record_dir / f"round{server_round}-node{p}.safetensors" for p in (0, 1)]
        weights = [float(_metadata(path)["num-examples"]) for path in good]
        updates = [load_file(path) for path in good]
        saved = load_file(folder / f"adapter-round-{server_round:03d}" / "adapter_model.safetensors")
        assert saved.keys() == updates[0].keys() == previous.keys()
        assert all(torch.isfinite(t).all() for t in saved.values())
        mean_update = {k: sum(w * u[k] for w, u in zip(weights, updates)) / sum(weights) for k in saved}
        error = torch.sqrt(sum(((saved[k] - previous[k] - mean_update[k]) ** 2).sum() for k in saved))
        size = torch.sqrt(sum((mean_update[k] ** 2).sum() for k in saved))
        assert float(error / size) < 2**-8
        previous = saved


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return handle.metadata()
