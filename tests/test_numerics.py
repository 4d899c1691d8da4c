"""Training is numerically right at the reference learning rates (5e-5 -> 1e-6), not only at toy ones.

trl keeps trainable weights of a quantized model in bf16, where a step of about lr vanishes
wherever |w| > lr * 2^8; 16-bit weights on the wire would do the same. These tests fail if any
of that comes back: LoRA weights and optimizer state must be float32 inside the trainer, every
LoRA entry must move every round, and a bf16 wire must give (nearly) the float32 wire's adapter.
"""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import TrainerCallback

from flowertune_llm.client import kept_model, training
from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.kept_model import peft_model
from flowertune_llm.client.model import build_adapter_skeleton, load_tokenizer
from flowertune_llm.client.training import train_adapter
from flowertune_llm.shared.adapters import adapter_state
from flowertune_llm.shared.devices import training_compute_dtype
from flowertune_llm.shared.settings import parse_config
from flowertune_llm.tools.simulation import simulate

from conftest import default_run_config

# The reference study's schedule (FlowerTune LLM: cosine from 5e-5 down to 1e-6).
REFERENCE_LR = {"train.learning-rate-max": 5e-5, "train.learning-rate-min": 1e-6}


class DtypeSpy(TrainerCallback):
    """Records, after the first optimizer step, the dtypes of the trainable weights and their optimizer state."""

    def __init__(self) -> None:
        self.weights: set[torch.dtype] = set()
        self.optimizer_state: set[torch.dtype] = set()
        self.lora_output: set[torch.dtype] = set()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 1:
            self.weights = {p.dtype for p in model.parameters() if p.requires_grad}
            self.optimizer_state = {value.dtype for per_param in optimizer.state.values()
                                    for value in per_param.values() if torch.is_tensor(value) and value.dim() > 0}


@pytest.mark.integration  # two rounds of local training per bit width
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_lora_weights_and_optimizer_state_are_float32_in_the_trainer_and_compute_in_the_compute_dtype(monkeypatch, bits):
    config = parse_config(default_run_config(**{"model.quantization": bits, "train.max-steps": 2}))
    tokenizer = load_tokenizer(config.model)
    train_data, _ = load_client_data(config.dataset, 0, 2)
    spy = DtypeSpy()
    build_trainer = training._trainer

    def spied_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(spy)
        return trainer

    monkeypatch.setattr(training, "_trainer", spied_trainer)
    monkeypatch.setattr(kept_model, "_kept", None)
    # A freshly built model, then the kept one (the second call returns the same object).
    fresh = peft_model(config.model, reuse=True)
    for round_number, model in enumerate((fresh, peft_model(config.model, reuse=True)), start=1):
        lora_a = next(m.lora_A["default"] for m in model.modules() if isinstance(m, LoraLayer))
        hook = lora_a.register_forward_hook(lambda module, inputs, output: spy.lora_output.add(output.dtype))
        spy.weights, spy.optimizer_state, spy.lora_output = set(), set(), set()
        train_adapter(model, tokenizer, train_data, config.train, learning_rate=5e-5, seed=round_number)
        hook.remove()
        assert spy.weights == {torch.float32}, f"round {round_number}: trainable weights {spy.weights}"
        assert spy.optimizer_state == {torch.float32}, f"round {round_number}: optimizer state {spy.optimizer_state}"
        # A bf16 base, or a quantized one on a GPU: bf16 autocast runs the LoRA matmuls in bf16 although
        # their weights are float32. A quantized base on a CPU computes in float32 (model.py says why).
        assert spy.lora_output == {training_compute_dtype() if bits in (4, 8) else torch.bfloat16}
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert fresh is model


def test_every_lora_entry_moves_in_one_round_of_local_training_at_the_smallest_reference_lr(config):
    model = peft_model(config.model, reuse=False)
    before = adapter_state(model)
    train_data, _ = load_client_data(config.dataset, 0, 2)
    train_adapter(model, load_tokenizer(config.model), train_data, config.train, learning_rate=1e-6, seed=1)
    after = adapter_state(model)
    for kind in ("lora_A", "lora_B"):
        names = [name for name in before if kind in name]
        moved = sum(int((after[n] != before[n]).sum()) for n in names) / sum(before[n].numel() for n in names)
        assert moved >= 0.99, f"{kind}: {moved:.1%} of entries moved at lr 1e-6"


def _run(tmp_path, transfer: str) -> list[dict[str, torch.Tensor]]:
    """Run 3 rounds at the reference schedule; return the global adapter before round 1 and after each round."""
    run_config = default_run_config(**{
        **REFERENCE_LR, "num-server-rounds": 3, "train.save-every-round": 1, "transfer.dtype": transfer,
        "strategy.fraction-evaluate": 0.0, "results.dir": str(tmp_path), "results.run-name": transfer,
    })
    simulate(run_config)
    config = parse_config(run_config)
    initial = adapter_state(build_adapter_skeleton(config.model, seed=config.train.seed))
    folder = tmp_path / transfer
    saved = [load_file(folder / f"adapter-round-{r:03d}" / "adapter_model.safetensors") for r in (1, 2, 3)]
    assert all(t.dtype == torch.float32 for adapter in saved for t in adapter.values())
    # peft saves without the adapter name ("default") that the state dict of a live model has.
    return [initial, *[{name: adapter[name] for name in initial} for adapter in saved]]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The same 3-round reference-schedule run with a bfloat16 and with a float32 wire."""
    folder = tmp_path_factory.mktemp("reference-lr")
    return {transfer: _run(folder, transfer) for transfer in ("bfloat16", "float32")}


@pytest.mark.integration  # reference_runs: two 3-round simulations
@pytest.mark.parametrize("transfer", ["bfloat16", "float32"])
def test_every_lora_entry_of_the_global_adapter_moves_every_round_at_the_reference_lr(reference_runs, transfer):
    adapters = reference_runs[transfer]
    for server_round in (1, 2, 3):
        before, after = adapters[server_round - 1], adapters[server_round]
        for kind in ("lora_A", "lora_B"):
            names = [name for name in before if kind in name]
            moved = sum(int((after[n] != before[n]).sum()) for n in names) / sum(before[n].numel() for n in names)
            assert moved >= 0.99, f"round {server_round}, {kind}: {moved:.1%} of entries moved"


@pytest.mark.integration
def test_a_bfloat16_wire_ends_where_the_float32_wire_does(reference_runs):
    initial, bf16_final = reference_runs["bfloat16"][0], reference_runs["bfloat16"][-1]
    float32_final = reference_runs["float32"][-1]
    difference = torch.sqrt(sum(((bf16_final[n] - float32_final[n]) ** 2).sum() for n in initial))
    total_update = torch.sqrt(sum(((float32_final[n] - initial[n]) ** 2).sum() for n in initial))
    assert total_update > 0
    assert float(difference / total_update) < 0.03
