"""`evaluate.on-receipt`: each train message evaluates the adapter it brings; the figures match separate evaluation.

Unit tests drive the strategy's hooks and the run recorder by hand; the integration tests run the
same seeded 3-round simulation with and without on-receipt evaluation, and a run interrupted
while a round waits for its evaluation, then resumed.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from flowertune_llm import client_app, server_app
from flowertune_llm.client.model import build_adapter_skeleton
from flowertune_llm.server.results import RunRecorder
from flowertune_llm.server.resume import find_resume_point
from flowertune_llm.server.strategy import build_strategy, lora_strategy
from flowertune_llm.shared.adapters import adapter_state, to_array_record
from flowertune_llm.shared.protocol import EVALUATE_RECEIVED, with_received_evaluation
from flowertune_llm.shared.settings import ConfigError, parse_config
from flowertune_llm.tools.simulation import simulate

from conftest import Grid, default_run_config, train_reply

LoraFedAvg = lora_strategy("fedavg")
GLOBAL = OrderedDict({"x.lora_A.weight": torch.tensor([[0.5, 0.5]]), "x.lora_B.weight": torch.tensor([[0.0]])})
TRAINED = OrderedDict({"x.lora_A.weight": torch.tensor([[1.0, 2.0]]), "x.lora_B.weight": torch.tensor([[4.0]])})


def _evaluation(loss: float, examples: int, correct: int) -> dict:
    """What the evaluate handler replies for a node with `examples` held-out examples."""
    return {"eval_loss": loss, "num-examples": examples, "exact-match-correct": correct,
            "exact-match-total": examples, "exact-match-correct/qa": correct, "exact-match-total/qa": examples,
            "time-eval-loss-s": 0.5, "time-exact-match-s": 1.0}


def _train_round(strategy, server_round: int, evaluations: list[dict] | None = None) -> list[Message]:
    """Send round `server_round`'s train messages and answer them (with `evaluations`, one per node)."""
    sent = list(strategy.configure_train(server_round, to_array_record(GLOBAL), ConfigRecord(), Grid(2)))
    replies = [train_reply(message, TRAINED, examples=10) for message in sent]
    for reply, evaluation in zip(replies, evaluations or []):
        if evaluation is not None:
            reply.content["metrics"] = MetricRecord(with_received_evaluation(reply.content["metrics"], evaluation))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    assert arrays is not None and not any(key.startswith("received") for key in metrics)
    return sent


# --- Settings --------------------------------------------------------------------------------


def test_on_receipt_is_off_by_default(config):
    assert config.evaluate.on_receipt is False


def test_on_receipt_without_client_evaluation_is_refused_with_both_keys_named():
    with pytest.raises(ConfigError) as raised:
        parse_config(default_run_config(**{"evaluate.on-receipt": True, "strategy.fraction-evaluate": 0.0}))
    assert str(raised.value) == (
        "evaluate.on-receipt must be false when strategy.fraction-evaluate = 0 (there is no client "
        "evaluation to move into the train messages), got True")


def test_a_bad_value_stops_the_server_before_any_work(monkeypatch):
    monkeypatch.setattr(server_app, "build_adapter_skeleton", lambda *a, **k: pytest.fail("built a model"))
    context = Context(run_id=1, node_id=0, node_config={}, state=None,
                      run_config=default_run_config(**{"evaluate.on-receipt": "yes"}))
    with pytest.raises(ConfigError, match="^evaluate.on-receipt must be true or false, got 'yes'$"):
        server_app.main(None, context)


# --- The strategy: which messages go out, where the figures land -------------------------------


@pytest.fixture
def _as_server_app(server_app_identity):
    """Build Messages outside a run."""


@pytest.mark.usefixtures("_as_server_app")
def test_no_evaluate_messages_before_the_last_round_and_one_final_evaluation():
    strategy = LoraFedAvg(learning_rate=lambda r: 0.1, evaluate_on_receipt=True, last_round=3)
    asked = []
    for server_round in (1, 2, 3):
        sent = _train_round(strategy, server_round, [_evaluation(1.0, 4, 2)] * 2 if server_round > 1 else None)
        asked.append([message.content["config"][EVALUATE_RECEIVED] for message in sent])
        evaluate = list(strategy.configure_evaluate(server_round, to_array_record(GLOBAL), ConfigRecord(), Grid(2)))
        assert len(evaluate) == (2 if server_round == 3 else 0)
        if server_round < 3:
            assert strategy.aggregate_evaluate(server_round, []) is None
    # Round 1 brings the initial adapter, which no round records; rounds 2 and 3 bring rounds 1 and 2's.
    assert asked == [[False, False], [True, True], [True, True]]
    assert [strategy.round_stats[r].get("eval_sampled") for r in (1, 2, 3)] == [2, 2, 2]


@pytest.mark.usefixtures("_as_server_app")
def test_received_evaluations_are_averaged_as_evaluate_replies_are():
    evaluations = [_evaluation(2.0, 3, 1), _evaluation(1.0, 1, 1)]
    on_receipt = LoraFedAvg(learning_rate=lambda r: 0.1, evaluate_on_receipt=True, last_round=5)
    _train_round(on_receipt, 1)
    _train_round(on_receipt, 2, evaluations)

    separate = LoraFedAvg(learning_rate=lambda r: 0.1)
    _train_round(separate, 1)
    sent = list(separate.configure_evaluate(1, to_array_record(GLOBAL), ConfigRecord(), Grid(2)))
    separate.aggregate_evaluate(1, [Message(RecordDict({"metrics": MetricRecord(evaluation)}), reply_to=message)
                                    for message, evaluation in zip(sent, evaluations)])

    eval_fields = {key: value for key, value in separate.round_stats[1].items() if key.startswith("eval_")}
    assert eval_fields["eval_loss"] == pytest.approx((3 * 2.0 + 1 * 1.0) / 4)
    assert {key: on_receipt.round_stats[1][key] for key in eval_fields} == eval_fields
    # Round 2's own record is training only: its evaluation comes with round 3.
    assert not any(key.startswith("eval_") for key in on_receipt.round_stats[2])


@pytest.mark.usefixtures("_as_server_app")
def test_a_train_reply_without_its_evaluation_still_trains_and_its_evaluation_is_rejected():
    strategy = LoraFedAvg(learning_rate=lambda r: 0.1, evaluate_on_receipt=True, last_round=3)
    _train_round(strategy, 1)
    _train_round(strategy, 2, [_evaluation(2.0, 3, 1), None])
    first, second = strategy.round_stats[1], strategy.round_stats[2]
    assert (first["eval_replies"], first["eval_rejected"], first["eval_loss"]) == (2, 1, 2.0)
    assert (second["train_replies"], second["train_rejected"]) == (2, 0)


@pytest.mark.usefixtures("_as_server_app")
def test_a_private_strategy_moves_evaluation_into_the_train_messages_too():
    config = parse_config(default_run_config(**{
        "evaluate.on-receipt": True, "privacy.differential-privacy": "client-adaptive",
        "privacy.noise-multiplier": 0.1, "transfer.dtype": "float32"}))
    strategy = build_strategy(config, learning_rate=lambda r: 0.1)
    assert strategy.evaluate_on_receipt and strategy.last_round == config.num_server_rounds
    assert list(strategy.configure_evaluate(1, to_array_record(GLOBAL), ConfigRecord(), Grid(2))) == []


# --- The recorder: a round waits for its evaluation, also across a resume -----------------------


class _Tracker:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log_round(self, record: dict) -> None:
        self.logged.append(dict(record))


def test_a_pending_round_is_written_at_once_and_completed_for_trackers_and_resume(tmp_path, monkeypatch):
    run_config = default_run_config(**{"num-server-rounds": 3, "evaluate.on-receipt": True,
                                       "results.dir": str(tmp_path), "results.run-name": "run"})
    config = parse_config(run_config)
    skeleton = build_adapter_skeleton(config.model, seed=0)
    arrays = to_array_record(adapter_state(skeleton))
    tracker = _Tracker()
    recorder = RunRecorder(tmp_path / "run", config, skeleton)
    recorder.trackers = [tracker]
    recorder.end_round(1, arrays, {"train_loss": 2.0, "bytes_down": 10}, evaluation_pending=True)
    assert recorder.pending == 1 and tracker.logged == []
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
    recorder.complete_round({"eval_sampled": 2, "eval_loss": 1.5, "bytes_down": 10})
    recorder.end_round(2, arrays, {"train_loss": 1.0, "bytes_down": 10}, evaluation_pending=True)
    assert [record["round"] for record in tracker.logged] == [1]
    assert tracker.logged[0]["eval_perplexity"] == pytest.approx(4.4817, rel=1e-4)

    # Killed here: round 2 is checkpointed and waits for its evaluation. The resumed run evaluates it
    # first (its strategy is told so) and its trackers never see round 2 without it.
    resume = find_resume_point(parse_config({**run_config, "train.resume-from": str(tmp_path / "run")}))
    assert resume.round == 2
    opened = []
    monkeypatch.setattr("flowertune_llm.server.results.open_trackers",
                        lambda folder, config, rounds: opened.append([r["round"] for r in rounds]) or [])
    resumed = RunRecorder(resume.folder, config, skeleton, earlier_rounds=resume.rounds)
    assert resumed.pending == 2 and opened == [[1]]
    resumed.complete_round({"eval_sampled": 2, "eval_loss": 1.0})
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert [(r["round"], r["eval_loss"], r["bytes_total"]) for r in rounds] == [(1, 1.5, 10), (2, 1.0, 20)]


# --- Whole runs: the same figures as separate evaluate messages ---------------------------------

ROUNDS = 3


def _run_config(results: Path, name: str, on_receipt: bool, **overrides) -> dict:
    return default_run_config(**{
        "num-server-rounds": ROUNDS, "train.max-steps": 3, "train.save-every-round": 0,
        "evaluate.exact-match-examples": 8, "evaluate.on-receipt": on_receipt,
        "results.dir": str(results), "results.run-name": name, **overrides,
    })


def _logging_handlers(log: Path):
    """Train and evaluate handlers that append one line per message to `log`: its kind and round."""

    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        with log.open("a") as out:
            out.write(f"train {config['run-round']} {bool(config.get(EVALUATE_RECEIVED, False))}\n")
        return client_app.train(msg, context)

    def evaluate(msg: Message, context: Context) -> Message:
        with log.open("a") as out:
            out.write(f"evaluate {msg.content['config']['server-round']}\n")
        return client_app.evaluate(msg, context)

    return train, evaluate


def _rounds(folder: Path) -> list[dict]:
    return json.loads((folder / "metrics.json").read_text())["rounds"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same seeded 3-round run with separate evaluate messages and with on-receipt evaluation."""
    results = tmp_path_factory.mktemp("on-receipt")
    folders = {}
    for name, on_receipt in (("separate", False), ("on-receipt", True)):
        train, evaluate = _logging_handlers(results / f"{name}.messages")
        simulate(_run_config(results, name, on_receipt), train=train, evaluate=evaluate)
        folders[name] = results / name
    return folders


def _messages(folder: Path) -> list[str]:
    return sorted((folder.parent / f"{folder.name}.messages").read_text().splitlines())


@pytest.mark.integration
def test_on_receipt_sends_one_message_per_node_and_round_and_one_final_evaluation(runs):
    assert _messages(runs["separate"]) == sorted(
        [f"train {r} False" for r in (1, 2, 3)] * 2 + [f"evaluate {r}" for r in (1, 2, 3)] * 2)
    assert _messages(runs["on-receipt"]) == sorted(
        ["train 1 False"] * 2 + ["train 2 True", "train 3 True"] * 2 + ["evaluate 3"] * 2)


@pytest.mark.integration
def test_on_receipt_records_the_same_figures_as_separate_evaluation(runs):
    separate, on_receipt = _rounds(runs["separate"]), _rounds(runs["on-receipt"])
    assert [r["round"] for r in on_receipt] == [1, 2, 3]
    for mine, reference in zip(on_receipt, separate):
        assert mine.keys() == reference.keys()
        # The same adapter evaluated on the same examples: equal up to CPU bf16 kernels' run-to-run noise.
        for key in ("train_loss", "eval_loss", "eval_perplexity"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-3), key
        for key in ("eval_exact_match", "eval_exact_match_examples", "eval_exact_match_per_task",
                    "eval_sampled", "eval_replies", "learning_rate", "train_examples"):
            assert mine[key] == reference[key], key
    # No evaluate messages: the adapter goes down once per node and round (plus the final evaluation).
    assert on_receipt[0]["bytes_down"] == separate[0]["bytes_down"] / 2
    assert on_receipt[-1]["bytes_down"] == separate[-1]["bytes_down"]


class _Interrupted(Exception):
    """Stands for the server process dying."""


@pytest.mark.integration
def test_a_run_interrupted_while_a_round_waits_for_its_evaluation_resumes_to_the_same_figures(runs, tmp_path,
                                                                                            monkeypatch):
    complete_round = RunRecorder.complete_round

    def die_in_round_2(recorder: RunRecorder, stats: dict) -> None:
        raise _Interrupted  # round 2 trained (and evaluated round 1's adapter); nothing of it recorded

    monkeypatch.setattr(RunRecorder, "complete_round", die_in_round_2)
    with pytest.raises(_Interrupted):
        simulate(_run_config(tmp_path, "cut", True))
    cut = tmp_path / "cut"
    assert [(r["round"], "eval_loss" in r) for r in _rounds(cut)] == [(1, False)]

    monkeypatch.setattr(RunRecorder, "complete_round", complete_round)
    train, evaluate = _logging_handlers(tmp_path / "cut.messages")
    simulate(_run_config(tmp_path, "cut", True, **{"train.resume-from": str(cut)}), train=train, evaluate=evaluate)
    # The resumed run's first round evaluates the checkpoint's adapter (round 1's) as it trains; the
    # final evaluation is Flower's round 2 (its count restarts at a resume), the run's round 3.
    assert _messages(cut) == sorted(["train 2 True", "train 3 True"] * 2 + ["evaluate 2"] * 2)
    reference = _rounds(runs["on-receipt"])
    for mine, expected in zip(_rounds(cut), reference, strict=True):
        assert mine.keys() == expected.keys()
        for key in ("train_loss", "eval_loss"):
            assert mine[key] == pytest.approx(expected[key], rel=1e-3), (mine["round"], key)
