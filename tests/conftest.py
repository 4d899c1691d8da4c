"""Shared test set-up: no network, a private model cache, and the app's default run config."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

# Set before transformers/datasets are imported: they read these once. Offline mode makes a hub
# look-up fail at once instead of after half a minute of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "FLOWERTUNE_CACHE" not in os.environ:
    # A private cache, so that tests never leave models in the user's; the built-in models that the
    # quick start's install built (the pretrained base takes minutes) are linked in, not rebuilt.
    _user_cache = Path.home() / ".cache" / "flowertune-llm"
    os.environ["FLOWERTUNE_CACHE"] = tempfile.mkdtemp(prefix="flowertune-test-cache-")
    for _built in _user_cache.glob("tiny-*"):
        if (_built / "config.json").is_file():
            (Path(os.environ["FLOWERTUNE_CACHE"]) / _built.name).symlink_to(_built, target_is_directory=True)

import pytest  # noqa: E402
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.common.config import get_fused_config_from_dir, parse_config_args  # noqa: E402

from flowertune_llm.shared.adapters import from_array_record, to_array_record  # noqa: E402
from flowertune_llm.shared.flower_compat import act_as_server_app  # noqa: E402
from flowertune_llm.shared.settings import AppConfig, parse_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def first_step_loss_and_gradients(trainer, model) -> tuple[float, int, dict]:
    """Return the loss, the loss-token count and the gradients of `trainer`'s first batch, as a step computes them."""

    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    model.zero_grad(set_to_none=True)
    tokens = (batch["labels"][:, 1:] != -100).sum()
    # The trainer runs the loss under the accelerator's mixed precision; so does this.
    with trainer.accelerator.autocast():
        loss = trainer.compute_loss(model, batch, num_items_in_batch=tokens)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), int(tokens), gradients


def default_run_config(**overrides) -> dict:
    """Return the flat run config of pyproject.toml, with `overrides` applied (kebab keys)."""
    return get_fused_config_from_dir(REPO_ROOT, overrides)


@pytest.fixture
def run_config() -> dict:
    """The default flat run config, as a ServerApp or ClientApp receives it."""
    return default_run_config()


@pytest.fixture
def config() -> AppConfig:
    """The default run config, parsed."""
    return parse_config(default_run_config())


@pytest.fixture(autouse=True)
def nothing_kept_between_tests():
    """Every test starts as a fresh client process does: no prepared data kept, no objects frozen by an earlier test."""
    yield
    # Only if a test loaded it: importing it here would load datasets into every test process.
    kept_data = sys.modules.get("flowertune_llm.client.kept_data")
    if kept_data is not None:
        kept_data.forget()
    gc.unfreeze()  # a kept model freezes what is alive out of garbage collections (kept_model.py)


# --- A finished default run, shared by the tests of the commands that read run folders ----------


def pytest_collection_modifyitems(config, items):
    """Refuse a test that uses `finished_run` without a tier marker: it would put a simulation in the unit tier."""
    untiered = [item.nodeid for item in items if "finished_run" in getattr(item, "fixturenames", ())
                and not any(item.get_closest_marker(tier) for tier in ("integration", "slow"))]
    if untiered:
        raise pytest.UsageError("these tests use finished_run (a simulation) but are marked neither integration nor slow: "
                                + ", ".join(untiered))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """Return the folder of a 2-round default run (tiny model, 2 clients), run once per session."""
    from flowertune_llm.tools.simulation import simulate

    parent = tmp_path_factory.mktemp("finished-run")
    simulate(default_run_config(**{
        "num-server-rounds": 2, "results.dir": str(parent), "results.run-name": "default",
    }))
    return parent / "default"


# Strategy tests: Messages built outside a run, a stand-in Grid, clients' train replies.
@pytest.fixture
def server_app_identity(monkeypatch):
    """Give this process the identity a ServerApp has, so Messages can be built outside a run."""
    act_as_server_app(monkeypatch.setattr)


class Grid:
    """The part of a Grid that sampling uses: the connected node ids."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self):
        return self.nodes


def update_for(instruction: Message, trained: dict) -> dict:
    """What a client sends for having trained the adapter it received into `trained`: the difference."""
    received = from_array_record(instruction.content["arrays"])
    return {name: t - received[name].float() if name in received and received[name].shape == t.shape else t
            for name, t in trained.items()}


def train_reply(instruction: Message, trained: dict | ArrayRecord, loss: float = 1.0, examples=10, dtype="float32",
           **extra_metrics) -> Message:
    """A client's reply for having trained the adapter it received into `trained` (a record goes as it is)."""
    record = trained if isinstance(trained, ArrayRecord) else to_array_record(update_for(instruction, trained), dtype)
    metrics = MetricRecord({"train_loss": loss, "num-examples": examples, **extra_metrics})
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=instruction)


def preset_run_config(path: Path, **overrides) -> dict:
    """Return the run config `flwr run . --run-config <path>` gives the apps (same flwr helpers)."""
    return get_fused_config_from_dir(REPO_ROOT, {**parse_config_args([str(path)]), **overrides})
