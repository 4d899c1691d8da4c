"""ServerApp: federated averaging of LoRA adapters, round after round.

  1. Validate the run config (any bad key, or a tracker whose package is missing, stops here,
     before a model is touched).
  2. Build the initial global adapter on a weightless copy of the base model.
  3. Or, with `train.resume-from`, pick up an interrupted run's adapter after its last round.
  4. Each round: sample clients, send the global adapter and the round's learning rate,
     average the returned adapters with FedAvg (weighted by examples), evaluate on the
     clients' held-out data (and, if configured, the server's), record metrics, checkpoint, and
     save the adapter when due. With `evaluate.on-receipt`, a round's clients' evaluation comes
     with the next round's train replies (and the last round's from one evaluate-only exchange), so
     each round's record is completed one round later.
"""

from __future__ import annotations

from functools import partial
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from flowertune_llm.client.data import check_dataset_source
from flowertune_llm.client.model import build_adapter_skeleton, load_model_config, load_tokenizer
from flowertune_llm.client.preflight import check_training_data
from flowertune_llm.client.training import check_flattened_batches, cosine_learning_rate
from flowertune_llm.server.evaluator import ServerEvaluator
from flowertune_llm.server.results import RunRecorder, run_folder
from flowertune_llm.server.resume import find_resume_point
from flowertune_llm.server.strategy import build_strategy
from flowertune_llm.server.tracking import check_trackers
from flowertune_llm.shared.adapters import adapter_state, to_array_record
from flowertune_llm.shared.devices import check_round_device
from flowertune_llm.shared.settings import parse_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds of FedAvg over LoRA adapters."""
    config = parse_config(context.run_config)
    check_trackers(config.results)
    check_dataset_source(config.dataset.name)
    load_model_config(config.model)
    check_training_data(config, load_tokenizer(config.model))
    skeleton = build_adapter_skeleton(config.model, seed=config.train.seed)
    # Padding-free batches are the default: a model that cannot keep their examples apart stops here.
    check_flattened_batches(skeleton, config.train)
    resume = find_resume_point(config) if config.train.resume_from else None
    folder = resume.folder if resume else run_folder(config.results, config)
    evaluator = ServerEvaluator(config) if config.evaluate.server_dataset else None
    recorder = RunRecorder(folder, config, skeleton, earlier_rounds=resume.rounds if resume else None)
    rounds_done = resume.round if resume else 0
    global_adapter = resume.arrays if resume else to_array_record(adapter_state(skeleton))
    log(INFO, "Results of this run go to %s", folder)
    if resume:
        log(INFO, "Resuming after round %d of %d", rounds_done, config.num_server_rounds)

    strategy = build_strategy(
        config,
        learning_rate=partial(
            cosine_learning_rate,
            num_rounds=config.num_server_rounds,
            lr_max=config.train.learning_rate_max,
            lr_min=config.train.learning_rate_min,
        ),
        round_offset=rounds_done,
    )
    # A resumed run whose last round still waits for its evaluation has it done by the next round.
    strategy.unevaluated_round = recorder.pending

    def after_round(server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:  # Flower's call before the first round: nothing finished yet
            return
        run_round = strategy.run_round(server_round)
        if recorder.pending is not None:  # this round's train messages evaluated its adapter
            recorder.complete_round(strategy.round_stats[recorder.pending])
        stats = dict(strategy.round_stats.get(run_round, {}))
        if evaluator and evaluator.is_due(run_round):
            stats.update(evaluator.evaluate(arrays))
        recorder.end_round(run_round, arrays, stats, evaluation_pending=strategy.evaluated_on_receipt(run_round))
        check_round_device(config.train.expect_gpu, run_round, recorder.rounds[-1].get("device"))

    if rounds_done < config.num_server_rounds:
        global_adapter = strategy.start(
            grid=grid,
            initial_arrays=global_adapter,
            num_rounds=config.num_server_rounds - rounds_done,
            timeout=config.strategy.round_timeout,
            train_config=ConfigRecord(),
            evaluate_fn=after_round,
        ).arrays
    final = recorder.finish(global_adapter)
    log(INFO, "Done. Metrics: %s | final global adapter: %s", folder / "metrics.json", final)
