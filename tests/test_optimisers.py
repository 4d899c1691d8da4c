"""Server optimisers by `strategy.name`: each one's update is the algorithm's formula, not FedAvg's.

Each test drives the strategy the app builds from its config through two rounds of hand-made
replies sent in bfloat16 (the default transfer), and compares the new global adapter with the
update computed here, in float64, from the paper's formula as Flower implements it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from flowertune_llm.server.strategy import LoraRounds, build_strategy
from flowertune_llm.shared.adapters import WIRE_DTYPES, to_array_record
from flowertune_llm.shared.settings import ConfigError, parse_config

from conftest import Grid, default_run_config, train_reply

# Values whose differences are exact in bfloat16, so the bf16 wire (which carries updates) changes
# nothing and the formulas can be checked exactly.
X0 = {"x.lora_A.weight": np.array([[0.5, -0.25, 1.0]]), "x.lora_B.weight": np.array([[0.0, 2.0]])}
ROUND_1 = [  # each node's adapter after local training in round 1
    {"x.lora_A.weight": np.array([[1.0, -0.5, 1.0]]), "x.lora_B.weight": np.array([[0.5, 1.0]])},
    {"x.lora_A.weight": np.array([[0.0, 0.25, 2.0]]), "x.lora_B.weight": np.array([[0.25, 3.0]])},
]
STEP_2 = [  # in round 2, each node moves the adapter it received by this much
    {"x.lora_A.weight": np.array([[0.25, 0.0, -0.5]]), "x.lora_B.weight": np.array([[-0.125, 0.5]])},
    {"x.lora_A.weight": np.array([[0.5, 0.125, 0.0]]), "x.lora_B.weight": np.array([[0.375, -0.5]])},
]


def _strategy(name: str, **settings) -> LoraRounds:
    run_config = default_run_config(**{"strategy.name": name, **{f"strategy.{k}": v for k, v in settings.items()}})
    return build_strategy(parse_config(run_config), learning_rate=lambda r: 0.1)


def _round(strategy: LoraRounds, server_round: int, global_arrays: dict, node_adapters: list[dict]) -> dict:
    """Send `global_arrays`, reply with the updates to `node_adapters` (equal examples), return the new global arrays."""
    record = ArrayRecord(OrderedDict((k, torch.tensor(v, dtype=torch.float32)) for k, v in global_arrays.items()))
    sent = list(strategy.configure_train(server_round, record, ConfigRecord(), Grid(2)))
    assert {a.dtype for m in sent for a in m.content["arrays"].values()} == {WIRE_DTYPES["bfloat16"]}
    updates = [to_array_record({k: torch.tensor(adapter[k] - global_arrays[k]) for k in adapter}, "bfloat16")
               for adapter in node_adapters]
    replies = [train_reply(m, update, examples=10) for m, update in zip(sent, updates)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert {a.dtype for a in arrays.values()} == {"float32"}
    return {k: a.numpy().astype(np.float64) for k, a in arrays.items()}


def _two_rounds(strategy: LoraRounds) -> tuple[dict, dict, list[dict]]:
    """Run rounds 1 and 2; return the global arrays after each, and round 2's replies."""
    x1 = _round(strategy, 1, X0, ROUND_1)
    # In round 2 each node sends its step (exact in bf16); the server adds it to its float32 x1.
    round_2 = [{k: x1[k] + step[k] for k in x1} for step in STEP_2]
    x2 = _round(strategy, 2, x1, round_2)
    return x1, x2, round_2


def _mean(adapters: list[dict]) -> dict:
    return {k: np.mean([a[k] for a in adapters], axis=0) for k in adapters[0]}


def _close(actual: dict, expected: dict) -> None:
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=2e-6, atol=1e-7)


def _differs(actual: dict, other: dict) -> bool:
    return any(not np.allclose(actual[k], other[k], rtol=1e-4, atol=1e-6) for k in other)


@pytest.mark.parametrize(("name", "flower_class"), [
    ("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam),
    ("fedyogi", FedYogi), ("fedadagrad", FedAdagrad), ("fedavgm", FedAvgM),
])
def test_strategy_name_selects_flowers_strategy_with_its_parameters(name, flower_class):
    strategy = _strategy(name, **{"proximal-mu": 0.5, "server-momentum": 0.5, "eta": 0.03, "tau": 0.002})
    assert isinstance(strategy, flower_class) and isinstance(strategy, LoraRounds)
    expected = {"fedprox": ("proximal_mu", 0.5), "fedavgm": ("server_momentum", 0.5),
                "fedadam": ("eta", 0.03), "fedyogi": ("tau", 0.002), "fedadagrad": ("eta", 0.03)}
    if name in expected:
        attribute, value = expected[name]
        assert getattr(strategy, attribute) == value


@pytest.fixture(autouse=True)
def _as_server_app(server_app_identity):
    """Every test here builds Messages outside a run."""


def test_fedprox_sends_its_mu_and_averages_like_fedavg():
    strategy = _strategy("fedprox", **{"proximal-mu": 0.25})
    record = ArrayRecord(OrderedDict((k, torch.tensor(v, dtype=torch.float32)) for k, v in X0.items()))
    sent = list(strategy.configure_train(1, record, ConfigRecord(), Grid(2)))
    assert all(m.content["config"]["proximal-mu"] == 0.25 for m in sent)
    fedprox = _round(_strategy("fedprox"), 1, X0, ROUND_1)
    _close(fedprox, _mean(ROUND_1))


def test_fedavgm_carries_the_previous_step():
    lr, beta = 1.0, 0.9
    x1, x2, round_2 = _two_rounds(_strategy("fedavgm", **{"server-learning-rate": lr, "server-momentum": beta}))
    # Round 1: no momentum yet, so with lr 1 it is FedAvg.
    g1 = {k: X0[k] - _mean(ROUND_1)[k] for k in X0}
    _close(x1, {k: X0[k] - lr * g1[k] for k in X0})
    # Round 2: the step is this round's pseudo-gradient plus beta times the previous one.
    g2 = {k: x1[k] - _mean(round_2)[k] for k in X0}
    _close(x2, {k: x1[k] - lr * (beta * g1[k] + g2[k]) for k in X0})
    assert _differs(x2, _mean(round_2))  # FedAvg would give the plain mean


def test_fedavgm_server_learning_rate_scales_the_step():
    x1, _, _ = _two_rounds(_strategy("fedavgm", **{"server-learning-rate": 0.5, "server-momentum": 0.0}))
    _close(x1, {k: X0[k] + 0.5 * (_mean(ROUND_1)[k] - X0[k]) for k in X0})


def test_fedadam_steps_by_bias_corrected_first_over_second_moment():
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 0.001
    x1, x2, round_2 = _two_rounds(_strategy("fedadam", eta=eta, **{"beta-1": b1, "beta-2": b2}, tau=tau))
    m = {k: np.zeros_like(v) for k, v in X0.items()}
    v = {k: np.zeros_like(v) for k, v in X0.items()}
    x = X0
    for server_round, (actual, replies) in enumerate(((x1, ROUND_1), (x2, round_2)), start=1):
        delta = {k: _mean(replies)[k] - x[k] for k in x}
        m = {k: b1 * m[k] + (1 - b1) * delta[k] for k in x}
        v = {k: b2 * v[k] + (1 - b2) * delta[k] ** 2 for k in x}
        # Flower's bias correction counts one round ahead (powers of server_round + 1).
        eta_t = eta * np.sqrt(1 - b2 ** (server_round + 1)) / (1 - b1 ** (server_round + 1))
        expected = {k: x[k] + eta_t * m[k] / (np.sqrt(v[k]) + tau) for k in x}
        _close(actual, expected)
        assert _differs(actual, _mean(replies))
        x = actual
    # Adam's step is about eta per value whatever the size of the update: sign-like, not the mean.
    assert np.all(np.abs(x1["x.lora_A.weight"] - X0["x.lora_A.weight"])[0, 1:] > 0.5 * eta)


def test_fedyogi_second_moment_moves_by_the_sign_of_its_gap():
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 0.001
    x1, x2, round_2 = _two_rounds(_strategy("fedyogi", eta=eta, **{"beta-1": b1, "beta-2": b2}, tau=tau))
    m = {k: np.zeros_like(v) for k, v in X0.items()}
    v = {k: np.zeros_like(v) for k, v in X0.items()}
    x = X0
    for actual, replies in ((x1, ROUND_1), (x2, round_2)):
        delta = {k: _mean(replies)[k] - x[k] for k in x}
        m = {k: b1 * m[k] + (1 - b1) * delta[k] for k in x}
        v = {k: v[k] - (1 - b2) * delta[k] ** 2 * np.sign(v[k] - delta[k] ** 2) for k in x}
        _close(actual, {k: x[k] + eta * m[k] / (np.sqrt(v[k]) + tau) for k in x})
        assert _differs(actual, _mean(replies))
        x = actual


def test_fedadagrad_accumulates_squared_updates():
    eta, tau = 0.01, 0.001
    x1, x2, round_2 = _two_rounds(_strategy("fedadagrad", eta=eta, tau=tau))
    v = {k: np.zeros_like(val) for k, val in X0.items()}
    x = X0
    for actual, replies in ((x1, ROUND_1), (x2, round_2)):
        delta = {k: _mean(replies)[k] - x[k] for k in x}
        v = {k: v[k] + delta[k] ** 2 for k in x}
        _close(actual, {k: x[k] + eta * delta[k] / (np.sqrt(v[k]) + tau) for k in x})
        assert _differs(actual, _mean(replies))
        x = actual


SERVER_OPTIMISER_SETTINGS = {
    "fedadam": "strategy.name='fedadam'", "fedyogi": "strategy.name='fedyogi'",
    "fedadagrad": "strategy.name='fedadagrad'", "fedavgm": "strategy.name='fedavgm'",
}


@pytest.mark.parametrize("name", SERVER_OPTIMISER_SETTINGS)
def test_resume_is_refused_where_server_optimiser_state_would_be_lost(name, tmp_path):
    run_config = default_run_config(**{"strategy.name": name, "train.resume-from": str(tmp_path)})
    with pytest.raises(ConfigError, match=rf"train.resume-from cannot continue a run with strategy.name='{name}': "
                                          r"its server optimiser state .* is not checkpointed"):
        parse_config(run_config)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_stateless_strategies_can_resume(name, tmp_path):
    parse_config(default_run_config(**{"strategy.name": name, "train.resume-from": str(tmp_path)}))


BAD_STRATEGY_VALUES = [
    ("strategy.name", "scaffold", "strategy.name must be one of fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedavgm, got 'scaffold'"),
    ("strategy.proximal-mu", -0.1, "strategy.proximal-mu must be >= 0, got -0.1"),
    ("strategy.server-learning-rate", 0.0, "strategy.server-learning-rate must be > 0, got 0.0"),
    ("strategy.server-momentum", 1.0, "strategy.server-momentum must be in [0, 1), got 1.0"),
    ("strategy.eta", -1.0, "strategy.eta must be > 0, got -1.0"),
    ("strategy.beta-1", 1.5, "strategy.beta-1 must be in [0, 1), got 1.5"),
    ("strategy.beta-2", float("nan"), "strategy.beta-2 must be in [0, 1), got nan"),
    ("strategy.tau", 0, "strategy.tau must be > 0, got 0.0"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_STRATEGY_VALUES,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_STRATEGY_VALUES])
def test_bad_strategy_value_gives_one_clear_message(key, value, message):
    with pytest.raises(ConfigError) as raised:
        parse_config(default_run_config(**{key: value}))
    assert message in str(raised.value)
