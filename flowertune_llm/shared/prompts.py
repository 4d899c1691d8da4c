"""Alpaca prompt format: one instruction record becomes a prompt and the completion to learn."""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """Return the Alpaca prompt for an instruction and its optional input."""
    if context.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=context)
    return ALPACA_WITHOUT_INPUT.format(instruction=instruction)
