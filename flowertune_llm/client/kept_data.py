"""Keep the datasets trl prepared for training between rounds, where the client process lives on.

trl's SFTTrainer prepares its data when it is built: EOS appended to each completion, prompt and
prompt + completion tokenized, labels masked outside the completion, rows truncated to
`max_length` (or packed). A client builds a trainer every round (a new learning rate, seed and
optimizer) on the same data, and trl redid that work every time, twice for the held-out data (as
training and as evaluation set). In simulation a client's process serves every round, so each
prepared dataset is kept here, keyed by everything its rows depend on; a later trainer gets the
kept rows with trl's preparation switched off, and trains on exactly the rows it would have made.
The batches do not change: their order comes from the trainer's sampler, seeded per round, over
the same rows. A process that lives for one message (a deployment's ClientApp, a multi-device
worker) starts with nothing kept and prepares as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING

from datasets import Dataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainingArguments

# The SFTConfig fields that trl 1.16's preparation reads (`SFTTrainer._prepare_dataset`, and what
# its `__init__` sets up for it: the EOS token, the chat template, completion-only labels).
# `seed` counts only where trl shuffles the dataset while preparing it.
PREPARATION_FIELDS = (
    "max_length", "truncation_mode", "packing", "packing_strategy", "completion_only_loss", "assistant_only_loss",
    "dataset_text_field", "chat_template_path", "eos_token", "pad_token", "shuffle_dataset",
)
# Datasets kept at most, least recently used dropped first. A simulated client process may serve
# any of the federation's nodes, and each keeps its training and its held-out data: 32 covers 16
# nodes. Data read from files (Flower Datasets reads them all) is memory-mapped from the datasets
# cache, so an entry holds little memory; a dataset held in memory (a multi-device worker's) lives
# in a process of one message.
MAX_KEPT = 32

_kept: OrderedDict[Hashable, Dataset] = OrderedDict()


def tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> tuple:
    """Return what tells one tokenizer from another here: class, checkpoint, vocabulary size, special tokens, template.

    A checkpoint's tokenizer files are assumed not to change while the process lives, as for the
    kept base model (kept_model.py).
    """
    return (type(tokenizer).__qualname__, tokenizer.name_or_path, len(tokenizer),
            repr(sorted(tokenizer.special_tokens_map.items())), tokenizer.chat_template)


def preparation_key(data: object, tokenizer: PreTrainedTokenizerBase, args: TrainingArguments) -> Hashable | None:
    """Return the key of `data` as trl prepares it with `tokenizer` and `args`; None if it cannot be told apart.

    A `datasets.Dataset` is known by its fingerprint, which the datasets library derives from its
    source files or content and every transform applied since (it names the dataset's cache files;
    trl's own DPO and KTO trainers key their cached datasets by it too).
    """
    if not isinstance(data, Dataset):
        return None
    fields = tuple((name, getattr(args, name, None)) for name in PREPARATION_FIELDS)
    shuffle_seed = args.seed if getattr(args, "shuffle_dataset", False) else None
    return data._fingerprint, tokenizer_key(tokenizer), fields, shuffle_seed


def prepared(key: Hashable | None) -> Dataset | None:
    """Return the dataset kept for `key`, or None."""
    if key is None or key not in _kept:
        return None
    _kept.move_to_end(key)
    return _kept[key]


def keep(key: Hashable | None, dataset: Dataset) -> None:
    """Keep `dataset`, trl's preparation of the data `key` names, for later rounds."""
    if key is None:
        return
    _kept[key] = dataset
    _kept.move_to_end(key)
    while len(_kept) > MAX_KEPT:
        _kept.popitem(last=False)


def forget() -> None:
    """Drop every kept dataset."""
    _kept.clear()
