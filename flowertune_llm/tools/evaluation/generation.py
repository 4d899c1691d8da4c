"""Generate the model's answers to a benchmark's prompts, with the reference's decoding settings.

Three regimes, one per reference script: multiple-choice and yes/no questions (greedy, as many new
tokens as the gold answer of the batch's first example has), finance sentiment (greedy, batched,
up to 512 tokens in all) and code (sampled at temperature 0.2, top-p 0.95, seed 0, until a stop
word, as the bigcode harness's defaults).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase, set_seed

from flowertune_llm.tools.evaluation.prompts import Example, chat_wrapped
from flowertune_llm.tools.evaluation.scoring import finance_answer, stop_at_stop_words

# The reference's batch sizes. For choices the batch only decides the answer length (below); for
# finance it is the padded batch that generates together.
CHOICE_BATCH = 16
FINANCE_BATCH = 32
# Finance: the reference's generate(max_length=512), prompt included.
FINANCE_MAX_LENGTH = 512
CODE_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.95, "top_k": 0}
CODE_SEED = 0


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate_choices(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> list[str]:
    """Return the greedy answer to each multiple-choice or yes/no question.

    As in the reference, each batch of CHOICE_BATCH questions gets as many new tokens as its first
    gold answer tokenizes to ('A': 1; 'maybe' may be 2), and questions with identical prompts all
    get the answer generated last for that prompt.
    """
    by_prompt: dict[str, str] = {}
    for start in range(0, len(examples), CHOICE_BATCH):
        batch = examples[start:start + CHOICE_BATCH]
        new_tokens = len(tokenizer(batch[0].gold, add_special_tokens=False)["input_ids"])
        for example in batch:
            input_ids = tokenizer.encode(chat_wrapped(example.prompt), return_tensors="pt").to(model.device)
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=tokenizer.eos_token_id,
                )
            by_prompt[example.prompt] = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    return [by_prompt[example.prompt] for example in examples]


def generate_finance(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> list[str]:
    """Return the text after 'Answer: ' of each finance prompt's greedy continuation.

    Prompts are left-padded, so that every continuation follows its own prompt directly.
    """
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(examples), FINANCE_BATCH):
            prompts = [example.prompt for example in examples[start:start + FINANCE_BATCH]]
            tokens = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False).to(model.device)
            with torch.no_grad():
                output = model.generate(
                    **tokens, max_length=FINANCE_MAX_LENGTH, do_sample=False,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=_pad_id(tokenizer),
                )
            answers += [finance_answer(tokenizer.decode(row, skip_special_tokens=True)) for row in output]
    finally:
        tokenizer.padding_side = padding_side
    return answers


def generate_code(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[str]:
    """Return each prompt followed by its sampled completion, cut at the first stop word.

    `max_length` counts prompt and completion, capped at what the model's positions allow.
    """
    limit = min(max_length, getattr(model.config, "max_position_embeddings", max_length) or max_length)
    set_seed(CODE_SEED)
    programs = []
    for example in examples:
        input_ids = tokenizer.encode(example.prompt, return_tensors="pt").to(model.device)
        if input_ids.shape[1] >= limit:
            # The harness returns the prompt unchanged when it leaves no room to generate.
            programs.append(example.prompt)
            continue
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_length=limit,
                stop_strings=list(example.stop_words), tokenizer=tokenizer, pad_token_id=_pad_id(tokenizer),
                **CODE_SAMPLING,
            )
        decoded = tokenizer.decode(output[0], skip_special_tokens=True)
        # Like the harness: the prompt's length in characters is cut off the decoded sequence.
        programs.append(example.prompt + stop_at_stop_words(decoded[len(example.prompt):], example.stop_words))
    return programs
