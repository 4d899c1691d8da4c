"""Server-side evaluation: the global adapter's loss and exact match on a held-out set the server holds.

Off by default (`evaluate.server-dataset = ""`): it needs the base model's weights on the server,
which the server otherwise never loads. When on, the quantized base is built once, at the first
evaluation, and each evaluation only swaps the adapter in.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset
from flwr.app import ArrayRecord
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from flowertune_llm.adapters import from_array_record, load_adapter_state
from flowertune_llm.config import AppConfig
from flowertune_llm.data import ColumnMapping, DatasetSourceError, dataset_source, to_prompt_completion
from flowertune_llm.exact_match import exact_match, record_fields
from flowertune_llm.model import build_peft_model, load_tokenizer
from flowertune_llm.preflight import read_local_records
from flowertune_llm.training import evaluate_loss


KEY = "evaluate.server-dataset"


def load_heldout_data(name: str, columns: ColumnMapping = ColumnMapping()) -> Dataset:
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
    return to_prompt_completion(records, columns)


class ServerEvaluator:
    """Evaluates the global adapter every `evaluate.server-every` rounds and after the last one."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.data: Dataset = load_heldout_data(
            config.evaluate.server_dataset, ColumnMapping.from_settings(config.dataset)
        )
        self._model: PeftModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def is_due(self, server_round: int) -> bool:
        """Return whether round `server_round` ends with a server-side evaluation."""
        every = self.config.evaluate.server_every
        return server_round % every == 0 or server_round == self.config.num_server_rounds

    def evaluate(self, arrays: ArrayRecord) -> dict[str, object]:
        """Return the global adapter's mean response-token loss and exact match on the held-out set."""
        if self._model is None:
            self._model = build_peft_model(self.config.model)
            self._tokenizer = load_tokenizer(self.config.model)
        load_adapter_state(self._model, from_array_record(arrays))
        loss = evaluate_loss(self._model, self._tokenizer, self.data, self.config.train)
        settings = self.config.evaluate
        counts = exact_match(self._model, self._tokenizer, self.data, settings.exact_match_examples,
                             settings.max_new_tokens, batch_size=self.config.train.batch_size)
        return {"server_eval_loss": loss, **record_fields(counts, "server_exact_match")}
