"""Flower's internals behind shared/flower_compat.py: each still where the app expects it, on a tested flwr."""

from __future__ import annotations

import tomllib
from importlib.metadata import version

import flwr.serverapp.strategy as flower_strategies
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from flowertune_llm.shared import flower_compat
from flowertune_llm.shared.registry import DP_MODES, STRATEGIES

from conftest import REPO_ROOT


def _flwr_bounds() -> set[SpecifierSet]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {SpecifierSet(r.split("]", 1)[-1] if r.startswith("flwr[") else r.removeprefix("flwr"))
            for r in requirements if r.startswith(("flwr[", "flwr>", "flwr<", "flwr="))}


def test_pyproject_bounds_flwr_to_the_releases_the_compat_module_was_checked_on():
    low, high = flower_compat.TESTED_FLWR
    assert _flwr_bounds() == {SpecifierSet(f">={low},<{high}")}
    assert Version(version("flwr")) in SpecifierSet(f">={low},<{high}")


def test_flowers_adaptive_clipping_still_moves_its_bound_the_wrong_way():
    """Fails the day Flower fixes the direction: then drop AdaptivePrivateRounds' correction (server/privacy.py)."""
    wrapper = flower_strategies.DifferentialPrivacyServerSideAdaptiveClipping(
        flower_strategies.FedAvg(), noise_multiplier=0.0, num_sampled_clients=4,
        initial_clipping_norm=1.0, target_clipped_quantile=0.5, clip_norm_lr=0.2,
    )
    # Every update was clipped: the paper's rule grows the bound (C * e^{0.2 * 0.5}); Flower 1.42 shrinks it.
    getattr(wrapper, flower_compat.ADAPTIVE_CLIPPING_HOOK)(1.0)
    assert wrapper.clipping_norm == pytest.approx(2.718281828 ** -0.1), (
        "Flower's adaptive clipping now moves the bound another way: check whether it follows "
        "Andrew et al. 2021, and if so remove AdaptivePrivateRounds' correction"
    )


def test_every_registry_entry_names_a_flower_class():
    for entry in STRATEGIES.values():
        assert issubclass(getattr(flower_strategies, entry.flower_class), flower_strategies.FedAvg)
    for name, mode in DP_MODES.items():
        if mode.flower_class is not None:
            wrapper = getattr(flower_strategies, mode.flower_class)
            assert issubclass(wrapper, flower_strategies.Strategy), name
            assert hasattr(wrapper, flower_compat.ADAPTIVE_CLIPPING_HOOK) == mode.adaptive, name


def test_noise_stddev_is_the_multiplier_times_the_bound_over_the_sampled_clients():
    assert flower_compat.gaussian_noise_stddev(1.5, 2.0, 4) == pytest.approx(0.75)


def test_superlink_node_id_and_flower_home(tmp_path, monkeypatch):
    assert isinstance(flower_compat.superlink_node_id(), int)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    assert flower_compat.flower_home() == tmp_path


def test_superlink_connections_are_added_and_removed_in_the_flower_config(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    certificate = tmp_path / "ca.crt"
    certificate.write_text("not read here")
    config_file = flower_compat.add_superlink_connection("compat-test", "127.0.0.1:9093", certificate)
    text = config_file.read_text()
    assert config_file.parent == tmp_path and "compat-test" in text and "127.0.0.1:9093" in text
    flower_compat.remove_superlink_connection("compat-test", "127.0.0.1:9094")  # another address: kept
    assert "compat-test" in config_file.read_text()
    flower_compat.remove_superlink_connection("compat-test", "127.0.0.1:9093")
    assert "compat-test" not in config_file.read_text()


def test_a_federations_options_become_a_simulation_config():
    config = flower_compat.simulation_config({"num-supernodes": 3})
    assert config.num_supernodes == 3
