"""ClientApp: train the received global LoRA adapter on this node's data, or evaluate it.

Each message: build the quantized PEFT model (or reuse the one kept from the previous round),
load the global adapter, run trl's SFT trainer on this node's data (its partition in simulation,
its own `data-path` file in a deployment) for `train.max-steps` steps (with FedProx's proximal
term when the server sends `proximal-mu`), reply with the new adapter, the loss and the round's
timings. On the wire the reply carries the update, trained minus received, in the precision the
global adapter came in (`adapters.send_update_mod`, the outermost mod). With client-side
differential privacy, Flower's clipping mod clips the update inside it (`clipping.clipping_mod`).
"""

from __future__ import annotations

import datasets
import transformers
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel

from flowertune_llm.client.clipping import clipping_mod
from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.exact_match import exact_match
from flowertune_llm.client.kept_model import peft_model
from flowertune_llm.client.model import load_tokenizer
from flowertune_llm.client.preflight import check_node_data
from flowertune_llm.client.training import evaluate_loss, round_seed, train_adapter
from flowertune_llm.shared.adapters import (
    adapter_state,
    from_array_record,
    load_adapter_state,
    send_update_mod,
    to_array_record,
)
from flowertune_llm.shared.answer_counts import to_metrics
from flowertune_llm.shared.devices import loss_settings, prepare_client_device
from flowertune_llm.shared.protocol import (
    ARRAYS,
    CONFIG,
    EVAL_LOSS,
    LEARNING_RATE,
    METRICS,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    RUN_ROUND,
    TRAIN_LOSS,
)
from flowertune_llm.shared.settings import AppConfig, NodeSettings, for_node, parse_config, parse_node_config
from flowertune_llm.shared.telemetry import PhaseTimer, peak_memory_metrics, reset_peak_memory

app = ClientApp()
# Mods around the train handler, outermost first; `simulation.py` uses the same.
TRAIN_MODS = [send_update_mod, clipping_mod]


def _quiet_progress_bars() -> None:
    """Silence per-message progress bars (dataset maps, weight loading) in this client process.

    Every client prints them for every message, burying the server's one-line round summaries.
    """
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _settings(context: Context) -> tuple[AppConfig, NodeSettings]:
    """Return the run's settings as this node applies them, and what the node's config sets."""
    node = parse_node_config(context.node_config)
    return for_node(parse_config(context.run_config), node), node


def _model_with_global_adapter(config: AppConfig, msg: Message, timer: PhaseTimer) -> PeftModel:
    """Build (or reuse) the quantized PEFT model and load the global adapter the server sent."""
    with timer.phase("base"):
        model = peft_model(config.model, reuse=config.model.reuse_base)
    with timer.phase("adapter-load"):
        load_adapter_state(model, from_array_record(msg.content[ARRAYS]))
    return model


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Fine-tune the global adapter locally and return it with the training loss."""
    _quiet_progress_bars()
    timer = PhaseTimer()
    config, node = _settings(context)
    # Before any model exists: the device checks (devices.py), and this message's memory peaks.
    device = prepare_client_device(config.train.expect_gpu)
    reset_peak_memory()
    with timer.phase("data"):
        check_node_data(node)
        train_data, _ = load_client_data(config.dataset, node.partition_id, node.num_partitions)
    model = _model_with_global_adapter(config, msg, timer)
    round_config = msg.content[CONFIG]
    with timer.phase("train"):
        outcome = train_adapter(
            model,
            load_tokenizer(config.model),
            train_data,
            loss_settings(config.train, device),
            learning_rate=float(round_config[LEARNING_RATE]),
            seed=round_seed(config.train.seed, int(round_config[RUN_ROUND]), node.seed_offset),
            proximal_mu=float(round_config.get(PROXIMAL_MU, 0.0)),
        )
    with timer.phase("serialize"):
        # Whole float32 adapter; `send_update_mod` turns it into the update in transfer precision.
        arrays = to_array_record(adapter_state(model))
    metrics = MetricRecord({
        TRAIN_LOSS: outcome.loss,
        NUM_EXAMPLES: len(train_data),
        "train-tokens-per-s": outcome.tokens / max(timer.seconds["train"], 1e-9),
        # The training loop alone (the `train` phase also builds the trainer and tokenizes the data).
        "time-train-loop-s": round(outcome.loop_seconds, 4),
        **timer.metrics(),
        **peak_memory_metrics(),
        # 1 on a CUDA GPU, 0 on the CPU; the round's mean says where its clients trained (metrics.json `device`).
        "trained-on-gpu": float(device.on_gpu),
    })
    return Message(content=RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Return the global adapter's loss and exact-match counts on this node's held-out share."""
    _quiet_progress_bars()
    config, node = _settings(context)
    prepare_client_device(config.train.expect_gpu)
    check_node_data(node)
    _, eval_data = load_client_data(config.dataset, node.partition_id, node.num_partitions)
    if eval_data is None or len(eval_data) == 0:
        raise ValueError("dataset.validation-fraction leaves this node no held-out examples to evaluate")
    timer = PhaseTimer()
    model = _model_with_global_adapter(config, msg, timer)
    tokenizer = load_tokenizer(config.model)
    with timer.phase("eval-loss"):
        eval_loss = evaluate_loss(model, tokenizer, eval_data, config.train)
    with timer.phase("exact-match"):
        counts = exact_match(model, tokenizer, eval_data, config.evaluate.exact_match_examples,
                             config.evaluate.max_new_tokens, batch_size=config.train.batch_size)
    metrics = MetricRecord({EVAL_LOSS: eval_loss, NUM_EXAMPLES: len(eval_data), **to_metrics(counts),
                            **timer.metrics()})
    return Message(content=RecordDict({METRICS: metrics}), reply_to=msg)
