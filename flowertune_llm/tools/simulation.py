"""Run the app's ServerApp and ClientApp in one Python process, with a given run config.

For benchmarks and tests; users run `flwr run .`. `flwr.simulation.run_simulation` hands apps an
empty run config, so these wrappers give them the one `flwr run` would. Also runnable, so a test
can run (and kill) a simulation in a process of its own:
    python -m flowertune_llm.tools.simulation RUN_CONFIG_JSON [NUM_SUPERNODES [NUM_GPUS_PER_CLIENT]]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from flowertune_llm import client_app, server_app

ClientHandler = Callable[[Message, Context], Message]


def with_run_config(context: Context, run_config: dict) -> Context:
    """Return the context with `run_config` in it."""
    return Context(
        run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
        state=context.state, run_config=run_config,
    )


def apps(
    run_config: dict, train: ClientHandler = client_app.train, evaluate: ClientHandler = client_app.evaluate
) -> tuple[ServerApp, ClientApp]:
    """Return a ServerApp and ClientApp that run the app's own handlers (or `train`, `evaluate` instead)."""
    server, client = ServerApp(), ClientApp()

    @server.main()
    def _main(grid, context):
        server_app.main(grid, with_run_config(context, run_config))

    def _give_run_config(msg: Message, context: Context, call_next) -> Message:
        # Mods read the run config too, and they run before the handler.
        return call_next(msg, with_run_config(context, run_config))

    @client.train(mods=[_give_run_config, *client_app.TRAIN_MODS])
    def _train(msg, context):
        return train(msg, with_run_config(context, run_config))

    @client.evaluate()
    def _evaluate(msg, context):
        return evaluate(msg, with_run_config(context, run_config))

    return server, client


def client_resources(num_gpus: float = 0.0) -> dict[str, float]:
    """Return each ClientApp's Ray resources: one CPU, and `num_gpus` of a GPU (0: none, it trains on CPU)."""
    # Ray hides every GPU from an actor that asks for none (CUDA_VISIBLE_DEVICES=""), so a GPU
    # machine trains on CPU unless a share is asked for; a share of 0.5 puts two clients on a GPU.
    return {"num_cpus": 1, "num_gpus": num_gpus} if num_gpus > 0 else {"num_cpus": 1}


def simulate(
    run_config: dict, num_supernodes: int = 2, train: ClientHandler = client_app.train, num_gpus: float = 0.0,
    evaluate: ClientHandler = client_app.evaluate,
) -> None:
    """Run the app in Flower's simulation engine, one CPU (and `num_gpus` of a GPU) per client."""
    server, client = apps(run_config, train, evaluate)
    run_simulation(server, client, num_supernodes=num_supernodes,
                   backend_config={"client_resources": client_resources(num_gpus)})


if __name__ == "__main__":
    simulate(json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2]) if len(sys.argv) > 2 else 2,
             num_gpus=float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
