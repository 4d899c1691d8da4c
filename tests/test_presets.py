"""Every shipped preset passes the app's config validation; hub presets stop clearly when offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from flowertune_llm import server_app
from flowertune_llm.client.data import DatasetSourceError
from flowertune_llm.client.model import ModelSourceError
from flowertune_llm.shared.settings import parse_config

from conftest import REPO_ROOT, preset_run_config

PRESETS = sorted((REPO_ROOT / "presets").glob("*.toml"))
REFERENCE_SETTINGS = {
    "openllama-3b-4bit": ("openlm-research/open_llama_3b_v2", 4),
    "openllama-3b-8bit": ("openlm-research/open_llama_3b_v2", 8),
    "openllama-7b-4bit": ("openlm-research/open_llama_7b_v2", 4),
    "openllama-7b-8bit": ("openlm-research/open_llama_7b_v2", 8),
    "llama2-7b-4bit": ("meta-llama/Llama-2-7b-hf", 4),
}


def test_every_reference_setting_and_domain_has_a_preset():
    names = {path.stem for path in PRESETS}
    assert set(REFERENCE_SETTINGS) | {"medical-flashcards", "finance-sentiment", "code-alpaca"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.stem)
def test_preset_passes_config_validation(path):
    config = parse_config(preset_run_config(path))
    assert config.num_server_rounds >= 1


@pytest.mark.parametrize("name", sorted(REFERENCE_SETTINGS))
def test_reference_presets_hold_the_reference_setup(name):
    config = parse_config(preset_run_config(REPO_ROOT / "presets" / f"{name}.toml"))
    assert (config.model.name, config.model.quantization) == REFERENCE_SETTINGS[name]
    assert (config.model.lora.r, config.model.lora.alpha, config.model.lora.target_module_list) == (32, 64, None)
    assert config.model.gradient_checkpointing and config.num_server_rounds == 100
    train = config.train
    assert (train.seq_length, train.batch_size, train.max_steps) == (512, 16, 10)
    assert (train.learning_rate_max, train.learning_rate_min) == (5e-5, 1e-6)
    assert config.strategy.fraction_train == 0.1 and config.strategy.min_available_nodes == 20
    assert config.dataset.name == "vicgalle/alpaca-gpt4"


class NoGrid:
    """A Grid that fails the test if the ServerApp gets as far as talking to nodes."""

    def __getattr__(self, name):
        raise AssertionError(f"the ServerApp used the grid ({name}) although the hub is unreachable")


def _needs_hub(path: Path) -> bool:
    run_config = preset_run_config(path)
    return not all(str(run_config[key]).startswith("builtin:") for key in ("model.name", "dataset.name"))


@pytest.mark.parametrize("path", [p for p in PRESETS if _needs_hub(p)], ids=lambda p: p.stem)
def test_hub_preset_offline_stops_at_start_up_with_advice(path, tmp_path):
    run_config = preset_run_config(path, **{"results.dir": str(tmp_path / "results")})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises((DatasetSourceError, ModelSourceError), match="(cannot reach|cannot load) .*(Download it|local)"):
        server_app.main(NoGrid(), context)
    assert not (tmp_path / "results").exists()
