"""The built-in base is a pretrained model in miniature: it knows the world's tasks, in its notes' format."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from flowertune_llm.builtin.models import ensure_builtin_model
from flowertune_llm.builtin.world import NOTE_FORMAT, generate_heldout
from flowertune_llm.client.exact_match import exact_match
from flowertune_llm.shared.prompts import alpaca_prompt
from flowertune_llm.shared.registry import BUILTIN_MODEL_NAME


@pytest.fixture(scope="module")
def base():
    folder = ensure_builtin_model(BUILTIN_MODEL_NAME)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def _asked(prompt_of) -> Dataset:
    heldout = generate_heldout()
    return Dataset.from_dict({"prompt": [prompt_of(example) for example in heldout],
                              "completion": [example["output"] for example in heldout],
                              "category": [example["category"] for example in heldout]})


def test_a_word_is_one_token_wherever_it_stands(base):
    _, tokenizer = base
    alone = tokenizer("walrus", add_special_tokens=False)["input_ids"]
    assert len(alone) == 1
    in_sentence = tokenizer("apple river walrus\n\nwalrus", add_special_tokens=False)["input_ids"]
    assert in_sentence.count(alone[0]) == 2


def test_the_base_answers_held_out_questions_in_its_notes_better_than_as_alpaca_prompts(base):
    model, tokenizer = base
    in_notes = exact_match(model, tokenizer, _asked(lambda e: NOTE_FORMAT.format(**e)), 180, 8)
    as_alpaca = exact_match(model, tokenizer, _asked(lambda e: alpaca_prompt(e["instruction"], e["input"])), 180, 8)
    # Measured 2026-12-04: 94/180 in notes, 75/180 as Alpaca prompts; fine-tuning teaches the rest of the format.
    assert in_notes.accuracy >= 0.4, in_notes
    assert in_notes.per_task["count_words"] == (40, 40), in_notes
    assert as_alpaca.correct < in_notes.correct, as_alpaca
