"""The ServerApp stops at start-up, before any model or folder is made, on bad input."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from flowertune_llm import server_app
from flowertune_llm.client.data import DatasetSourceError
from flowertune_llm.client.model import ModelSourceError
from flowertune_llm.server.results import ResultsError
from flowertune_llm.shared.settings import ConfigError

from conftest import default_run_config


class NoGrid:
    """A Grid that fails the test if the ServerApp gets as far as talking to nodes."""

    def __getattr__(self, name):
        raise AssertionError(f"the ServerApp used the grid ({name}) despite bad input")


def _start(tmp_path, **overrides) -> None:
    run_config = default_run_config(**{"results.dir": str(tmp_path / "results"), **overrides})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.main(NoGrid(), context)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"model.quantization": 3}, ConfigError, "model.quantization must be 4 or 8"),
        ({"model.name": "no-such-org/no-such-model"}, ModelSourceError, "cannot load 'no-such-org/no-such-model'"),
        ({"dataset.name": "./missing.jsonl"}, DatasetSourceError, "no such file or folder"),
        ({"dataset.name": "no-such-org/no-such-data"}, DatasetSourceError, "cannot reach 'no-such-org/no-such-data'"),
    ],
)
def test_bad_input_stops_before_any_results_folder(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        _start(tmp_path, **overrides)
    assert not (tmp_path / "results").exists()


def test_existing_run_folder_is_never_overwritten(tmp_path):
    earlier = tmp_path / "results" / "mine"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text('{"rounds": [1]}')
    with pytest.raises(ResultsError, match="already holds a run"):
        _start(tmp_path, **{"results.run-name": "mine"})
    assert (earlier / "metrics.json").read_text() == '{"rounds": [1]}'


def test_unwritable_results_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ResultsError, match="is not a writable folder"):
        _start(tmp_path, **{"results.dir": str(blocker / "results")})
