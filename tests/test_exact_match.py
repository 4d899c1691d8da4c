"""Exact match: answer normalisation, per-task counts, and greedy answers of a real tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from datasets import Dataset
from flwr.app import MetricRecord

from flowertune_llm.client.exact_match import answers_match, exact_match, generate_answers, normalise_answer
from flowertune_llm.client.model import build_peft_model, load_tokenizer
from flowertune_llm.client.training import train_adapter
from flowertune_llm.server.evaluator import load_heldout_data
from flowertune_llm.shared.answer_counts import (
    ExactMatchCounts,
    combine_counts,
    from_metrics,
    is_per_task_key,
    record_fields,
    to_metrics,
    without_per_task_keys,
)


def test_normalisation_strips_collapses_whitespace_and_ignores_case_unless_asked():
    assert normalise_answer("  The capital\n of  France\tis Paris. ") == "the capital of france is paris."
    assert normalise_answer(" GARDEN   Oyster ", case_sensitive=True) == "GARDEN Oyster"
    assert answers_match(" elppa\n", "elppa", "reverse_word")
    assert answers_match("PARIS", "Paris", "")  # user data without a task: case-insensitive
    # The uppercase task's answer is its case: lower case is wrong there, spacing is not.
    assert not answers_match("garden oyster", "GARDEN OYSTER", "uppercase")
    assert answers_match("GARDEN  OYSTER ", "GARDEN OYSTER", "uppercase")
    assert not answers_match("37.", "37", "add_numbers")


def test_counts_add_up_per_task_and_combine_as_an_example_weighted_mean():
    a = ExactMatchCounts(3, 4, {"add_numbers": (1, 2), "uppercase": (2, 2)})
    b = ExactMatchCounts(0, 6, {"add_numbers": (0, 6)})
    both = combine_counts([a, b])
    assert (both.correct, both.total) == (3, 10) and both.accuracy == pytest.approx(0.3)
    assert both.per_task == {"add_numbers": (1, 8), "uppercase": (2, 2)}
    assert both.task_accuracy("add_numbers") == pytest.approx(1 / 8) and both.task_accuracy("opposite") == 0.0
    assert ExactMatchCounts().accuracy == 0.0 and combine_counts([]) == ExactMatchCounts()


class _Parrot(torch.nn.Module):
    """Stands in for a PeftModel: 'generates' the text after the prompt's last 'say:'."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.device = torch.device("cpu")

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        said = [self.tokenizer(p.rsplit("say:", 1)[1] + self.tokenizer.eos_token).input_ids[:max_new_tokens]
                for p in prompts]
        width = max(map(len, said))
        padded = [ids + [self.tokenizer.pad_token_id] * (width - len(ids)) for ids in said]
        return torch.cat([input_ids, torch.tensor(padded)], dim=1)


def test_per_task_counts_follow_the_category_column(config):
    tokenizer = load_tokenizer(config.model)
    data = Dataset.from_dict({
        "prompt": ["say: elppa", "say: 38", "say: garden oyster", "say: GARDEN OYSTER", "say: 5"],
        "completion": ["elppa", "37", "GARDEN OYSTER", "GARDEN OYSTER", "5"],
        "category": ["reverse_word", "add_numbers", "uppercase", "uppercase", "count_words"],
    })
    counts = exact_match(_Parrot(tokenizer), tokenizer, data, max_examples=4, max_new_tokens=16, batch_size=3)
    assert (counts.correct, counts.total) == (2, 4)  # the fifth example is beyond max_examples
    assert counts.per_task == {"add_numbers": (0, 1), "reverse_word": (1, 1), "uppercase": (1, 2)}
    untasked = exact_match(_Parrot(tokenizer), tokenizer, data.remove_columns("category"), 5, 16)
    assert (untasked.correct, untasked.total, untasked.per_task) == (4, 5, {})


# --- A real tiny model -------------------------------------------------------------------------


MEMORISED_TASKS = ("add_numbers", "first_word", "larger_number", "last_word")


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """The default tiny model before and after overfitting its adapter on four held-out examples it got wrong."""
    from flowertune_llm.shared.settings import parse_config

    from conftest import default_run_config

    config = parse_config(default_run_config())
    tokenizer = load_tokenizer(config.model)
    torch.manual_seed(0)
    model = build_peft_model(config.model)
    # Short answers of different lengths, so that a batch pads and its answers end at different steps;
    # for each task the first held-out question the untrained adapter answers wrong (the base knows
    # some answers before fine-tuning).
    heldout = load_heldout_data("builtin:tiny-instructions-heldout")
    answers = generate_answers(model, tokenizer, heldout["prompt"], 24)
    picked = {}
    for index, (task, answer, reference) in enumerate(zip(heldout["category"], answers, heldout["completion"])):
        if task in MEMORISED_TASKS and task not in picked and not answers_match(answer, reference, task):
            picked[task] = index
    four = heldout.select([picked[task] for task in MEMORISED_TASKS])
    before = exact_match(model, tokenizer, four, max_examples=4, max_new_tokens=24)
    settings = dataclasses.replace(config.train, max_steps=60, batch_size=4)
    train_adapter(model, tokenizer, four, settings, learning_rate=1e-2, seed=0)
    return model, tokenizer, four, before


@pytest.mark.integration  # memorised: 60 steps of training
def test_memorising_turns_the_wrong_answers_right(memorised):
    model, tokenizer, four, before = memorised
    assert (before.correct, before.total) == (0, 4)
    after = exact_match(model, tokenizer, four, max_examples=4, max_new_tokens=24)
    assert (after.correct, after.total) == (4, 4), generate_answers(model, tokenizer, four["prompt"], 24)
    assert after.per_task == {task: (1, 1) for task in MEMORISED_TASKS}
    assert model.training  # evaluation leaves the model as it found it


@pytest.mark.integration
def test_batched_left_padded_answers_equal_one_at_a_time_and_stop_at_eos(memorised):
    model, tokenizer, four, _ = memorised
    batched = generate_answers(model, tokenizer, four["prompt"], max_new_tokens=24, batch_size=4)
    assert batched == [generate_answers(model, tokenizer, [prompt], 24, batch_size=1)[0] for prompt in four["prompt"]]
    assert batched == four["completion"]  # nothing after EOS is kept
    # The bound holds: at most one new token comes back, whatever the model would say next.
    clipped = generate_answers(model, tokenizer, four["prompt"], max_new_tokens=1)
    assert all(len(tokenizer(answer, add_special_tokens=False).input_ids) <= 1 for answer in clipped)


def test_counts_travel_as_metrics_and_come_back_whole():
    counts = ExactMatchCounts(3, 7, {"add_numbers": (1, 4), "capital": (2, 3)})
    metrics = to_metrics(counts)
    assert metrics["exact-match-correct"] == 3 and metrics["exact-match-total"] == 7
    assert sorted(k for k in metrics if is_per_task_key(k)) == [
        "exact-match-correct/add_numbers", "exact-match-correct/capital",
        "exact-match-total/add_numbers", "exact-match-total/capital"]
    assert from_metrics(MetricRecord({**metrics, "eval_loss": 1.5})) == counts
    assert to_metrics(ExactMatchCounts()) == {} and from_metrics({}) == ExactMatchCounts()
    assert set(without_per_task_keys(MetricRecord(metrics)).keys()) == {"exact-match-correct", "exact-match-total"}
    assert record_fields(counts, "eval_exact_match") == {
        "eval_exact_match": 3 / 7, "eval_exact_match_examples": 7,
        "eval_exact_match_per_task": {"add_numbers": 0.25, "capital": 2 / 3}}
