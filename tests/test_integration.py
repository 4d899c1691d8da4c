"""The real ServerApp and ClientApp, in one process, for 2 rounds with 2 clients on a 4- and 8-bit base."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.model import build_adapter_skeleton, resolve_model_path
from flowertune_llm.shared.adapters import adapter_state
from flowertune_llm.shared.settings import parse_config
from flowertune_llm.tools.simulation import simulate

from conftest import default_run_config

# Every test here runs the ServerApp and ClientApp in one process.
pytestmark = pytest.mark.integration


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("model_name", "bits"), [
    ("builtin:tiny-llama", 4),
    ("builtin:tiny-llama", 8),
    # Other architectures (other module names, biases, LayerNorm, partial rotary): same test.
    ("builtin:tiny-mistral", 4),
    ("builtin:tiny-qwen2", 4),
    ("builtin:tiny-phi", 4),
])
def test_two_rounds_two_clients(tmp_path, model_name, bits):
    run_config = default_run_config(**{
        "num-server-rounds": 2,
        "model.name": model_name,
        "model.quantization": bits,
        "train.save-every-round": 1,
        "results.dir": str(tmp_path),
        "results.run-name": "run",
    })
    config = parse_config(run_config)
    checkpoint = Path(resolve_model_path(config.model.name))
    weights_file = checkpoint / "model.safetensors"
    weights_before = _sha256(weights_file)

    simulate(run_config)

    folder = tmp_path / "run"
    metrics = json.loads((folder / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["train_replies"] == 2 and r["train_failures"] == 0 and r["eval_replies"] == 2 for r in rounds)
    assert rounds[1]["train_loss"] < rounds[0]["train_loss"]
    assert rounds[1]["eval_loss"] < rounds[0]["eval_loss"]
    assert rounds[0]["learning_rate"] > rounds[1]["learning_rate"]
    # The slowest client's training time is kept beside the example-weighted mean of both.
    assert all(r["time_train_slowest_s"] >= r["time_train_s"] - 1e-9 and r["time_train_s"] > 0 for r in rounds)
    # ... and the clients' evaluation phases: held-out loss, exact match.
    assert all(r["eval_time_eval_loss_s"] > 0 and r["eval_time_exact_match_s"] > 0 for r in rounds)
    # Every round reports exact match over both clients' held-out shares (at most 64 examples each).
    held_out = [load_client_data(config.dataset, p, 2)[1] for p in (0, 1)]
    asked = [share.select(range(min(config.evaluate.exact_match_examples, len(share)))) for share in held_out]
    for record in rounds:
        assert 0.0 <= record["eval_exact_match"] <= 1.0
        assert record["eval_exact_match_examples"] == sum(len(share) for share in asked)
        assert set(record["eval_exact_match_per_task"]) == {task for share in asked for task in share["category"]}

    # The base checkpoint is untouched; only adapter tensors were saved.
    assert _sha256(weights_file) == weights_before
    for name in ("adapter-round-001", "adapter-round-002", "adapter-final"):
        assert (folder / name / "adapter_config.json").is_file()
    final = load_file(folder / "adapter-final" / "adapter_model.safetensors")
    assert final and all("lora_" in key for key in final)

    # The global adapter moved away from the initial one.
    initial = adapter_state(build_adapter_skeleton(config.model, seed=config.train.seed))
    assert any(not torch.allclose(initial[key], final[key].float()) for key in initial)

    # It loads back onto the base model and changes what the model computes.
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert type(base).__name__.lower().startswith(model_name.removeprefix("builtin:tiny-"))
    tokens = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        base_logits = base(tokens).logits.clone()
        tuned = PeftModel.from_pretrained(base, folder / "adapter-final")
        tuned_logits = tuned(tokens).logits
    assert not torch.allclose(base_logits, tuned_logits)
    assert (folder / "run-config.toml").read_text().count(f"model.quantization = {bits}") == 1
