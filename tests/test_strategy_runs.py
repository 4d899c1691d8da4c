"""End to end in one process: a server optimiser on non-IID data, and FedProx with client-side DP.

Two short runs of the real ServerApp and ClientApp (2 clients, 2 rounds, 3 local steps each).
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common.config import flatten_dict
from safetensors.torch import load_file

from flowertune_llm.client.model import build_adapter_skeleton
from flowertune_llm.shared.adapters import adapter_state
from flowertune_llm.shared.settings import parse_config
from flowertune_llm.tools.simulation import simulate

from conftest import REPO_ROOT, default_run_config

# Every test here runs the ServerApp and ClientApp in one process.
pytestmark = pytest.mark.integration


def _run(tmp_path: Path, **overrides) -> tuple[list[dict], dict, dict]:
    """Run 2 rounds; return the round records, the initial and the round-1 global adapters."""
    run_config = default_run_config(**{
        "num-server-rounds": 2, "train.max-steps": 3, "train.save-every-round": 1,
        "results.dir": str(tmp_path), "results.run-name": "run", **overrides,
    })
    simulate(run_config)
    folder = tmp_path / "run"
    rounds = json.loads((folder / "metrics.json").read_text())["rounds"]
    config = parse_config(run_config)
    initial = adapter_state(build_adapter_skeleton(config.model, seed=config.train.seed))
    round_1 = load_file(folder / "adapter-round-001" / "adapter_model.safetensors")
    # peft saves without the adapter name; the skeleton's keys are peft's state-dict keys too.
    assert set(round_1) == set(initial)
    return rounds, initial, {k: v.float() for k, v in round_1.items()}


def test_fedadam_on_the_noniid_preset_steps_at_most_eta_per_value(tmp_path):
    preset = flatten_dict(tomllib.loads((REPO_ROOT / "presets" / "tiny-noniid-dirichlet.toml").read_text()))
    eta = 0.002
    rounds, initial, round_1 = _run(tmp_path, **preset, **{"strategy.name": "fedadam", "strategy.eta": eta})
    assert [r["train_replies"] for r in rounds] == [2, 2]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["eval_loss"]) for r in rounds)
    # FedAdam's round-1 step per value is eta_t·m/(sqrt(v)+tau) with |m| = 0.1|d|, sqrt(v) = 0.1|d|:
    # below eta_t = eta·sqrt(1 − 0.99²)/(1 − 0.9²), whatever the clients' mean moved (FedAvg's step).
    eta_1 = eta * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    steps = torch.cat([(round_1[k] - initial[k]).abs().flatten() for k in initial])
    assert 0 < float(steps.max()) <= eta_1 * (1 + 1e-4)
    assert float(steps.max()) > 0.5 * eta_1  # values that moved far locally take nearly the full step


def test_fedprox_with_client_side_dp_clips_noises_and_reports_epsilon(tmp_path):
    pytest.importorskip("dp_accounting", reason='Flower\'s accountant needs pip install "flwr[dp]"')
    clip, noise = 1e-4, 1.0
    rounds, initial, round_1 = _run(tmp_path, **{
        "strategy.name": "fedprox", "strategy.proximal-mu": 0.1,
        "privacy.differential-privacy": "client-fixed", "privacy.noise-multiplier": noise,
        "privacy.clipping-norm": clip, "transfer.dtype": "float32",
    })
    assert [r["train_replies"] for r in rounds] == [2, 2]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["eval_loss"]) for r in rounds)
    assert 0 < rounds[0]["privacy_epsilon"] < rounds[1]["privacy_epsilon"]
    stddev = noise * clip / 2
    assert rounds[0]["dp_noise_stddev"] == pytest.approx(stddev)
    # The global step is the mean of updates clipped to 1e-4 plus noise of norm stddev·sqrt(values):
    # unclipped, 3 local steps at lr 0.01 move the adapter by more than 1.
    values = sum(t.numel() for t in initial.values())
    step = math.sqrt(sum(float(((round_1[k] - initial[k]) ** 2).sum()) for k in initial))
    assert step <= clip + 1.05 * stddev * math.sqrt(values)
    assert step >= 0.95 * stddev * math.sqrt(values)
