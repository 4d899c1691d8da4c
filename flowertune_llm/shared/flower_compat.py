"""Flower's internals the app relies on, walled off here, with the flwr releases they were checked on.

Everything else imports Flower's public API only (flwr.app, flwr.clientapp, flwr.serverapp,
flwr.simulation, flwr.common.config). What lives below is private to Flower and may move in any
release; pyproject.toml bounds flwr to TESTED_FLWR, and tests/test_flower_compat.py checks each
name here against the installed Flower, so a new release that moves one fails there, by name.
Imports are inside the functions: a ClientApp that imports this module pulls in nothing of the
server side or of Flower's CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# flwr releases this module was checked against: >= the first, < the second (pyproject's bound).
TESTED_FLWR = ("1.42", "1.43")

# The method Flower's adaptive-clipping wrappers call to move their bound each round
# (flwr.serverapp.strategy.dp_adaptive_clipping). server/privacy.py overrides it: Flower 1.42 moves
# the bound the wrong way (tests/test_flower_compat.py fails on the day Flower fixes it).
ADAPTIVE_CLIPPING_HOOK = "_geometric_update"


def superlink_node_id() -> int:
    """Return the node id under which the SuperLink itself answers for a node that left."""
    from flwr.common.constant import SUPERLINK_NODE_ID

    return SUPERLINK_NODE_ID


def gaussian_noise_stddev(noise_multiplier: float, clipping_norm: float, sampled_clients: int) -> float:
    """Return the stddev of the noise Flower's central-DP wrappers add to the mean of clipped updates."""
    from flwr.supercore.differential_privacy import compute_stdv

    return compute_stdv(noise_multiplier, clipping_norm, sampled_clients)


def flower_home() -> Path:
    """Return the Flower home folder (FLWR_HOME, else ~/.flwr) that holds the CLI's config.toml."""
    from flwr.supercore.utils import get_flwr_home

    return get_flwr_home()


def add_superlink_connection(name: str, address: str, root_certificates: Path) -> Path:
    """Add (or replace) SuperLink connection `name` in the Flower CLI's config file; return that file."""
    from flwr.cli.flower_config import write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    write_superlink_connection(SuperLinkConnection(name=name, address=address,
                                                   root_certificates=str(root_certificates)))
    return flower_home() / "config.toml"


def remove_superlink_connection(name: str, address: str) -> None:
    """Remove SuperLink connection `name` from the Flower CLI's config file if it still points at `address`."""
    from flwr.cli.flower_config import read_flower_config, write_flower_config

    config, _ = read_flower_config()
    connections = config.get("superlink", {})
    if connections.get(name, {}).get("address") == address:
        del connections[name]
        write_flower_config(config)


def load_supernode_public_key(path: Path) -> Any:
    """Load a SuperNode public key as `flwr supernode register` does (None when it is not one)."""
    from flwr.cli.supernode.register import try_load_public_key

    return try_load_public_key(path)


def simulation_config(settings: dict[str, Any]) -> Any:
    """Return the SimulationConfig Flower builds from a federation's `[...options]` table (flat keys)."""
    from flwr.supercore.utils import simulation_config_from_json

    return simulation_config_from_json({key.replace("-", "_"): value for key, value in settings.items()})


def act_as_server_app(set_attribute) -> None:
    """Give this process the task identity a ServerApp has, so that Messages can be built outside a run.

    `set_attribute(obj, name, value)` applies it (pytest's monkeypatch.setattr undoes it afterwards).
    """
    from flwr.supercore.task_identity import TaskIdentity

    for attribute, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        set_attribute(TaskIdentity, attribute, value)
