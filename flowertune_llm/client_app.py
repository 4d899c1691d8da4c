"""ClientApp: train the received global LoRA adapter on this node's data, or evaluate it.

Each message: build the quantized PEFT model (or reuse the one kept from the previous round),
load the global adapter (with `train.num-devices` > 1: in that many worker processes, data-parallel,
see client/multi_device.py), run trl's SFT trainer on this node's data (its partition in simulation,
its own `data-path` file in a deployment) for `train.max-steps` steps (with FedProx's proximal
term when the server sends `proximal-mu`), reply with the new adapter, the loss and the round's
timings. On the wire the reply carries the update, trained minus received, in the precision the
global adapter came in (`adapters.send_update_mod`, the outermost mod). With client-side
differential privacy, Flower's clipping mod clips the update inside it (`clipping.clipping_mod`).

Importing this module loads Flower and the settings only; each handler imports the client code it
runs (torch, transformers, peft, trl behind it) when its message arrives. A deployment starts one
process per message, so nothing is loaded that the message does not use, and a message that fails
early (a node without data) fails before the training libraries are loaded.
"""

from __future__ import annotations

from logging import WARNING
from typing import TYPE_CHECKING

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from flowertune_llm.client.clipping import clipping_mod
from flowertune_llm.shared.protocol import (
    ARRAYS,
    CONFIG,
    EVAL_LOSS,
    EVALUATE_RECEIVED,
    LEARNING_RATE,
    METRICS,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    RUN_ROUND,
    TRAIN_LOSS,
    with_received_evaluation,
)
from flowertune_llm.shared.settings import AppConfig, NodeSettings, for_node, parse_config, parse_node_config

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from flowertune_llm.shared.telemetry import PhaseTimer

app = ClientApp()


def send_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """`adapters.send_update_mod` (it needs torch, so it is imported with the first message)."""
    from flowertune_llm.shared.adapters import send_update_mod as mod

    return mod(msg, context, call_next)


# Mods around the train handler, outermost first; `simulation.py` uses the same.
TRAIN_MODS = [send_update_mod, clipping_mod]


def _quiet_progress_bars() -> None:
    """Silence per-message progress bars (dataset maps, weight loading) in this client process.

    Every client prints them for every message, burying the server's one-line round summaries.
    """
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _settings(context: Context) -> tuple[AppConfig, NodeSettings]:
    """Return the run's settings as this node applies them, and what the node's config sets."""
    node = parse_node_config(context.node_config)
    return for_node(parse_config(context.run_config), node), node


def _model_with_global_adapter(config: AppConfig, msg: Message, timer: PhaseTimer) -> PeftModel:
    """Build (or reuse) the quantized PEFT model and load the global adapter the server sent."""
    from flowertune_llm.client.kept_model import peft_model
    from flowertune_llm.shared.adapters import from_array_record, load_adapter_state

    with timer.phase("base"):
        model = peft_model(config.model, reuse=config.model.reuse_base)
    with timer.phase("adapter-load"):
        load_adapter_state(model, from_array_record(msg.content[ARRAYS]))
    return model


def _evaluation(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, eval_data: Dataset, config: AppConfig, timer: PhaseTimer
) -> dict:
    """Return the model's held-out loss and exact-match counts on `eval_data`, as an evaluate reply's metrics."""
    from flowertune_llm.client.exact_match import exact_match
    from flowertune_llm.client.training import evaluate_loss
    from flowertune_llm.shared.answer_counts import to_metrics

    with timer.phase("eval-loss"):
        eval_loss = evaluate_loss(model, tokenizer, eval_data, config.train)
    with timer.phase("exact-match"):
        counts = exact_match(model, tokenizer, eval_data, config.evaluate.exact_match_examples,
                             config.evaluate.max_new_tokens, batch_size=config.train.batch_size)
    return {EVAL_LOSS: eval_loss, NUM_EXAMPLES: len(eval_data), **to_metrics(counts)}


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Fine-tune the global adapter locally and return it with the training loss.

    With `evaluate.on-receipt` the server may ask (EVALUATE_RECEIVED) for the received adapter's
    evaluation first: the same figures the evaluate handler computes, in the same reply.
    """
    from flowertune_llm.client.data import load_client_data
    from flowertune_llm.client.kept_model import kept_tokenizer
    from flowertune_llm.client.multi_device import RoundJob, train_received_adapter
    from flowertune_llm.client.preflight import check_node_data
    from flowertune_llm.client.training import round_seed
    from flowertune_llm.shared.adapters import from_array_record, to_array_record
    from flowertune_llm.shared.devices import check_one_gpu, prepare_client_device
    from flowertune_llm.shared.telemetry import PhaseTimer, peak_memory_metrics, reset_peak_memory

    _quiet_progress_bars()
    timer = PhaseTimer()
    config, node = _settings(context)
    # Before any model exists: the device checks (devices.py), and this message's memory peaks.
    device = prepare_client_device(config.train.expect_gpu, config.train.num_devices)
    reset_peak_memory()
    with timer.phase("data"):
        check_node_data(node)
        train_data, eval_data = load_client_data(config.dataset, node.partition_id, node.num_partitions)
    round_config = msg.content[CONFIG]
    received = from_array_record(msg.content[ARRAYS])
    model, evaluation = None, {}
    if round_config.get(EVALUATE_RECEIVED, False):
        if eval_data is None or len(eval_data) == 0:
            # The server counts the missing evaluation as rejected; the training still counts.
            log(WARNING, "dataset.validation-fraction leaves this node no held-out examples: "
                "the received adapter is not evaluated")
        else:
            if config.train.num_devices > 1:
                check_one_gpu()  # evaluation runs in this process, on one GPU at most
            model = _model_with_global_adapter(config, msg, timer)
            eval_timer = PhaseTimer()
            evaluation = {**_evaluation(model, kept_tokenizer(config.model), eval_data, config, eval_timer),
                          **eval_timer.metrics()}
    job = RoundJob(
        learning_rate=float(round_config[LEARNING_RATE]),
        seed=round_seed(config.train.seed, int(round_config[RUN_ROUND]), node.seed_offset),
        proximal_mu=float(round_config.get(PROXIMAL_MU, 0.0)),
    )
    # In this process on one device (on the model just evaluated, if any); in a worker process per
    # device on several (multi_device.py).
    trained, outcome = train_received_adapter(config, train_data, received, job, device, timer, model=model)
    with timer.phase("serialize"):
        # Whole float32 adapter; `send_update_mod` turns it into the update in transfer precision.
        arrays = to_array_record(trained)
    metrics = MetricRecord(with_received_evaluation({
        TRAIN_LOSS: outcome.loss,
        NUM_EXAMPLES: len(train_data),
        "train-tokens-per-s": outcome.tokens / max(timer.seconds["train"], 1e-9),
        # The training loop alone (the `train` phase also builds the trainer and tokenizes the data).
        "time-train-loop-s": round(outcome.loop_seconds, 4),
        **timer.metrics(),
        **peak_memory_metrics(),
        # 1 on a CUDA GPU, 0 on the CPU; the round's mean says where its clients trained (metrics.json `device`).
        "trained-on-gpu": float(device.on_gpu),
    }, evaluation))
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Return the global adapter's loss and exact-match counts on this node's held-out share."""
    from flowertune_llm.client.data import load_client_data
    from flowertune_llm.client.kept_model import kept_tokenizer
    from flowertune_llm.client.preflight import check_node_data
    from flowertune_llm.shared.devices import prepare_client_device
    from flowertune_llm.shared.telemetry import PhaseTimer

    _quiet_progress_bars()
    config, node = _settings(context)
    prepare_client_device(config.train.expect_gpu)
    check_node_data(node)
    _, eval_data = load_client_data(config.dataset, node.partition_id, node.num_partitions)
    if eval_data is None or len(eval_data) == 0:
        raise ValueError("dataset.validation-fraction leaves this node no held-out examples to evaluate")
    timer = PhaseTimer()
    model = _model_with_global_adapter(config, msg, timer)
    evaluation = _evaluation(model, kept_tokenizer(config.model), eval_data, config, timer)
    metrics = MetricRecord({**evaluation, **timer.metrics()})
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)
