"""The simulation federations shipped in federations/: each parses as Flower parses it, and runs as declared.

`flwr run . --federation-config federations/<name>.toml` takes Flower's simulation settings; each
file's comment names the preset (`--run-config presets/<name>.toml`, app settings) that goes with it,
which says how many of the nodes are sampled per round.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from flowertune_llm.client.data import load_client_data
from flowertune_llm.shared import flower_compat
from flowertune_llm.shared.settings import parse_config

from conftest import REPO_ROOT, default_run_config
from flower_env import flwr, local_superlink_pids, private_flwr_env, stop_pids

FEDERATIONS = REPO_ROOT / "federations"
FEDERATION_FILES = sorted(FEDERATIONS.glob("*.toml"))


def simulation_config(path: Path):
    """Parse a federation file the way `flwr run --federation-config` does."""
    return flower_compat.simulation_config(parse_config_args([str(path)]))


def paired_run_config(federation: Path) -> Path:
    """Return the preset a federation file's documented command runs with."""
    match = re.search(r"--run-config (presets/\S+\.toml)", federation.read_text())
    assert match, f"{federation.name} documents no `--run-config presets/...` command"
    return REPO_ROOT / match.group(1)


def sampled_per_round(num_nodes: int, fraction: float, min_nodes: int) -> int:
    """Flower's sample size: the fraction of connected nodes, at least `min_nodes`."""
    return max(int(num_nodes * fraction), min_nodes)


def test_the_reference_federations_are_shipped():
    names = {path.stem for path in FEDERATION_FILES}
    assert {"small-cpu", "reference-cpu", "reference-gpu", "reference-half-gpu"} <= names
    assert simulation_config(FEDERATIONS / "reference-gpu.toml").client_resources_num_gpus == 1.0
    assert simulation_config(FEDERATIONS / "reference-half-gpu.toml").client_resources_num_gpus == 0.5


@pytest.mark.parametrize("federation", FEDERATION_FILES, ids=lambda path: path.name)
def test_federation_file_is_a_valid_simulation_config(federation):
    config = simulation_config(federation)
    assert config.HasField("num_supernodes") and config.num_supernodes >= 1
    assert config.HasField("client_resources_num_cpus") and config.client_resources_num_cpus >= 1
    assert 0.0 <= config.client_resources_num_gpus <= 1.0


@pytest.mark.parametrize("federation", FEDERATION_FILES, ids=lambda path: path.name)
def test_federation_and_its_run_config_sample_what_they_declare(federation):
    nodes = simulation_config(federation).num_supernodes
    overrides = parse_config_args([str(paired_run_config(federation))])
    assert set(overrides) <= set(default_run_config()), "flwr run refuses keys pyproject.toml does not declare"
    strategy = parse_config(default_run_config(**overrides)).strategy
    assert strategy.min_available_nodes <= nodes, "sampling would wait forever for nodes that never come"
    train = sampled_per_round(nodes, strategy.fraction_train, strategy.min_train_nodes)
    assert strategy.min_train_replies <= train <= nodes
    if federation.stem.startswith("reference"):
        assert (nodes, train) == (20, 2)
    if federation.stem == "small-cpu":
        assert (nodes, train) == (4, 2)


@pytest.mark.slow
def test_small_federation_runs_and_samples_as_declared(tmp_path):
    """`flwr run` with the shipped small federation: 4 simulated SuperNodes, 2 sampled per round."""
    federation = FEDERATIONS / "small-cpu.toml"
    results = tmp_path / "results"
    # `--run-config` takes one TOML file or key=values, not both: extend a copy of the shipped preset.
    run_config = tmp_path / "run-config.toml"
    run_config.write_text(paired_run_config(federation).read_text() + (
        f"num-server-rounds = 2\ntrain.max-steps = 3\nresults.dir = '{results}'\nresults.run-name = 'small'\n"
    ))
    flwr_home = tmp_path / "flwr-home"
    env = private_flwr_env(flwr_home)
    try:
        completed = flwr(["run", ".", "--stream", "--federation-config", str(federation),
                          "--run-config", str(run_config)], env)
    finally:
        stop_pids(local_superlink_pids(flwr_home))
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert output.count("configure_train: Sampled 2 nodes (out of 4)") == 2, output[-4000:]
    assert output.count("configure_evaluate: Sampled 2 nodes (out of 4)") == 2, output[-4000:]
    rounds = json.loads((results / "small" / "metrics.json").read_text())["rounds"]
    assert [(r["train_sampled"], r["train_replies"], r["eval_sampled"], r["eval_replies"]) for r in rounds] == [(2, 2, 2, 2)] * 2
    # 4 partitions of the built-in data, 10% of each held out: each round trains on two nodes' shares.
    config = parse_config(default_run_config())
    shares = [len(load_client_data(config.dataset, node, 4)[0]) for node in range(4)]
    pairs = {a + b for i, a in enumerate(shares) for b in shares[i + 1:]}
    assert all(r["train_examples"] in pairs for r in rounds), (shares, rounds)
    assert (results / "small" / "adapter-final" / "adapter_model.safetensors").is_file()
