"""LoRA target modules resolve per architecture; names a model lacks stop with the names it has."""

from __future__ import annotations

import pytest
from peft.tuners.lora import LoraLayer

from flowertune_llm.builtin.models import ARCHITECTURES
from flowertune_llm.client.model import ModelSourceError, build_adapter_skeleton
from flowertune_llm.shared.registry import BUILTIN_MODELS
from flowertune_llm.shared.settings import parse_config

from conftest import default_run_config

# peft's per-architecture defaults, which the reference relied on by passing no target_modules.
PEFT_DEFAULTS = {
    "builtin:tiny-llama": {"q_proj", "v_proj"},
    "builtin:tiny-mistral": {"q_proj", "v_proj"},
    "builtin:tiny-qwen2": {"q_proj", "v_proj"},
    "builtin:tiny-phi": {"q_proj", "v_proj", "fc1", "fc2"},
}
ALL_LINEAR = {
    "builtin:tiny-llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "builtin:tiny-mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "builtin:tiny-qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "builtin:tiny-phi": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"},
}


def _targeted(model_name: str, targets: str) -> set[str]:
    settings = parse_config(default_run_config(**{"model.name": model_name, "model.lora.target-modules": targets})).model
    skeleton = build_adapter_skeleton(settings, seed=0)
    return {name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules() if isinstance(module, LoraLayer)}


def test_every_registered_builtin_model_has_an_architecture_the_builder_knows():
    assert {entry.architecture for entry in BUILTIN_MODELS.values()} <= set(ARCHITECTURES)


@pytest.mark.parametrize("model_name", sorted(BUILTIN_MODELS))
def test_target_modules_resolve_per_architecture(model_name):
    assert _targeted(model_name, "peft-default") == PEFT_DEFAULTS[model_name]
    assert _targeted(model_name, "all-linear") == ALL_LINEAR[model_name]


def test_names_a_model_lacks_are_refused_with_the_names_it_has():
    with pytest.raises(ModelSourceError, match="'o_proj,gate_proj' does not fit PhiForCausalLM.*dense, fc1, fc2"):
        _targeted("builtin:tiny-phi", "o_proj,gate_proj")


def test_unknown_builtin_model_is_a_config_error():
    with pytest.raises(ValueError, match="model.name must be a hub id, a local folder or one of builtin:tiny-llama"):
        parse_config(default_run_config(**{"model.name": "builtin:tiny-gpt"}))
