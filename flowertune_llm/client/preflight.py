"""Start-up checks of the training data: by the server before the first round, by a node on its own file.

A bad data file would otherwise surface as an obscure error inside every client in round 1 (an
empty JSONL file raises a bare StopIteration in `datasets`), or not at all: non-UTF-8 bytes are
silently replaced, and an example whose prompt fills `train.seq-length` trains on nothing.
"""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

from datasets import Dataset, load_dataset
from flwr.common.logger import log
from transformers import PreTrainedTokenizerBase

from flowertune_llm.client.data import ColumnMapping, DatasetSourceError, dataset_source, to_prompt_completion
from flowertune_llm.shared.settings import DATA_PATH_KEY, AppConfig, NodeSettings

TEXT_FORMATS = ("json", "csv")


def _check_utf8(path: Path, key: str) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DatasetSourceError(
            f"{key}: '{path}' is not UTF-8 text: byte 0x{data[error.start]:02x} at line {line} "
            "(convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def read_local_records(name: str, key: str = "dataset.name") -> Dataset | None:
    """Read a local dataset file with clear errors; None for a hub dataset or a local folder."""
    dataset, data_file = dataset_source(name, key)
    if data_file is None:
        return None
    path = Path(data_file)
    if dataset in TEXT_FORMATS:
        _check_utf8(path, key)
    if path.stat().st_size == 0 or (dataset in TEXT_FORMATS and not path.read_text(encoding="utf-8").strip()):
        raise DatasetSourceError(f"{key}: '{name}' is empty")
    try:
        records = load_dataset(dataset, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parse errors in several exception types
        raise DatasetSourceError(f"{key}: cannot read '{name}' as {dataset}: {type(error).__name__}: {error}") from None
    if len(records) == 0:
        raise DatasetSourceError(f"{key}: '{name}' holds no records")
    return records


def check_node_data(node: NodeSettings) -> None:
    """Fail with one clear message if this node's own data (node config `data-path`) cannot be read."""
    if not node.data_path:
        return
    key = f"node config {DATA_PATH_KEY}"
    if not Path(node.data_path).expanduser().exists():
        raise DatasetSourceError(f"{key}: no such file or folder '{node.data_path}' on this SuperNode")
    read_local_records(node.data_path, key=key)


def check_training_data(config: AppConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail with one clear message if the local training data cannot be trained on as configured."""
    records = read_local_records(config.dataset.name)
    if records is None:
        return
    examples = to_prompt_completion(records, ColumnMapping.from_settings(config.dataset))
    limit = config.train.seq_length
    prompt_lengths = [len(ids) for ids in tokenizer(list(examples["prompt"]))["input_ids"]]
    too_long = [index for index, length in enumerate(prompt_lengths) if length >= limit]
    if too_long:
        first = too_long[0]
        raise DatasetSourceError(
            f"dataset.name: {len(too_long)} example(s) in '{config.dataset.name}' have a prompt of "
            f"train.seq-length={limit} tokens or more, so no response token would be learned from them "
            f"(first: record {first}, {prompt_lengths[first]} prompt tokens). Raise train.seq-length or "
            "remove those records."
        )
    completion_lengths = [len(ids) for ids in tokenizer(list(examples["completion"]))["input_ids"]]
    truncated = sum(p + c + 1 > limit for p, c in zip(prompt_lengths, completion_lengths))
    if truncated:
        log(WARNING, "%d of %d examples are longer than train.seq-length=%d tokens; their responses "
            "are truncated", truncated, len(examples), limit)
