"""Server-side evaluation: the global adapter's loss and exact match on a held-out set the server holds.

Off by default (`evaluate.server-dataset = ""`): it needs the base model's weights on the server,
which the server otherwise never loads. When on, each evaluation runs in a child process that sees
only `evaluate.server-device` (CUDA_VISIBLE_DEVICES): there it builds an inference model (the
quantized base, not prepared for training, with the LoRA structure), loads the global adapter,
evaluates and exits, so nothing of it stays in the server's memory or on a GPU between rounds.
The server's own process would otherwise hold a training model on GPU 0 for the whole run,
outside the GPU shares Ray gives the clients, and trl refuses a process that sees several GPUs.
    python -m flowertune_llm.server.evaluator FOLDER   # the child: FOLDER holds run-config.json, adapter.safetensors
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from datasets import Dataset, load_dataset
from flwr.app import ArrayRecord
from peft import PeftModel
from safetensors.torch import load_file, save_file

from flowertune_llm.client.data import ColumnMapping, DatasetSourceError, dataset_source, to_prompt_completion
from flowertune_llm.client.exact_match import exact_match
from flowertune_llm.client.model import load_inference_base, load_tokenizer, wrap_with_lora
from flowertune_llm.client.preflight import read_local_records
from flowertune_llm.client.training import evaluate_loss
from flowertune_llm.shared.adapters import from_array_record, load_adapter_state
from flowertune_llm.shared.answer_counts import record_fields
from flowertune_llm.shared.devices import DeviceError, one_gpu_environment, visible_gpus
from flowertune_llm.shared.settings import AppConfig, ModelSettings, parse_config, to_run_config

RESULT_PREFIX = "SERVER-EVAL-RESULT "
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds flowertune_llm/


KEY = "evaluate.server-dataset"


def load_heldout_data(name: str, columns: ColumnMapping | None = None) -> Dataset:
    """Return the server's held-out prompt/completion data: a local file or folder, or a hub `test` split.

    Its columns are read with the training data's mapping (`dataset.*-column`).
    """
    records = read_local_records(name, KEY)
    if records is None:
        dataset, _ = dataset_source(name, KEY)
        try:
            records = load_dataset(dataset, split="train" if Path(dataset).is_dir() else "test")
        except Exception as error:  # offline, no `test` split, unreadable folder
            raise DatasetSourceError(f"{KEY}: cannot load '{name}': {type(error).__name__}: {error}") from None
    return to_prompt_completion(records, columns or ColumnMapping())


def evaluation_gpu(device: str, gpus: list[str]) -> str:
    """Return CUDA_VISIBLE_DEVICES for the evaluating child: "" for `cpu`, else the one GPU `device` names."""
    if device == "cpu":
        return ""
    index = int(device.partition(":")[2] or 0)
    if index >= len(gpus):
        raise DeviceError(
            f"evaluate.server-device={device!r}: the server sees {len(gpus)} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use 'cpu' or a GPU it sees"
        )
    return gpus[index]


def inference_model(settings: ModelSettings) -> PeftModel:
    """Return the quantized base in eval mode with the adapter's LoRA structure: no k-bit training set-up."""
    base = load_inference_base(settings.name, settings.quantization, trust_remote_code=settings.trust_remote_code)
    return wrap_with_lora(base, settings).eval()


def evaluate_in_this_process(config: AppConfig, adapter: dict) -> dict[str, object]:
    """Return the adapter's mean response-token loss and exact match on the server's held-out set."""
    data = load_heldout_data(config.evaluate.server_dataset, ColumnMapping.from_settings(config.dataset))
    model = inference_model(config.model)
    tokenizer = load_tokenizer(config.model)
    load_adapter_state(model, adapter)
    loss = evaluate_loss(model, tokenizer, data, config.train)
    settings = config.evaluate
    counts = exact_match(model, tokenizer, data, settings.exact_match_examples, settings.max_new_tokens,
                         batch_size=config.train.batch_size)
    return {"server_eval_loss": loss, **record_fields(counts, "server_exact_match")}


class ServerEvaluator:
    """Evaluates the global adapter every `evaluate.server-every` rounds and after the last one."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        # Read here too, so that a missing or unreadable set stops the run before round 1.
        self.data: Dataset = load_heldout_data(
            config.evaluate.server_dataset, ColumnMapping.from_settings(config.dataset)
        )
        self.gpu = evaluation_gpu(config.evaluate.server_device, visible_gpus())

    def is_due(self, server_round: int) -> bool:
        """Return whether round `server_round` ends with a server-side evaluation."""
        every = self.config.evaluate.server_every
        return server_round % every == 0 or server_round == self.config.num_server_rounds

    def evaluate(self, arrays: ArrayRecord) -> dict[str, object]:
        """Evaluate the global adapter in a child process on `evaluate.server-device`; return its figures."""
        with tempfile.TemporaryDirectory(prefix="flowertune-server-eval-") as folder:
            state = {name: tensor.float().contiguous() for name, tensor in from_array_record(arrays).items()}
            save_file(state, os.path.join(folder, "adapter.safetensors"))
            Path(folder, "run-config.json").write_text(json.dumps(to_run_config(self.config)), encoding="utf-8")
            environment = one_gpu_environment(os.environ, self.gpu)
            # Under `flwr run` the app is imported from its unpacked FAB, which the child must find too.
            environment["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
            completed = subprocess.run([sys.executable, "-m", "flowertune_llm.server.evaluator", folder],
                                       capture_output=True, text=True, check=False, env=environment)
        lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if completed.returncode != 0 or not lines:
            raise RuntimeError(f"server-side evaluation failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
        return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


if __name__ == "__main__":
    _folder = Path(sys.argv[1])
    _config = parse_config(json.loads((_folder / "run-config.json").read_text(encoding="utf-8")))
    _figures = evaluate_in_this_process(_config, load_file(_folder / "adapter.safetensors"))
    print(RESULT_PREFIX + json.dumps(_figures), flush=True)
