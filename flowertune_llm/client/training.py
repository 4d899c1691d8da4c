"""Local work of one client in one round: SFT of the LoRA weights, and held-out loss.

The loss covers response tokens only: the data has `prompt` and `completion` columns, and trl
masks the prompt's labels. The learning rate is constant within a round; it changes across rounds
(`cosine_learning_rate`), as in the FlowerTune reference. With FedProx the local objective gets
the proximal term (mu/2)·||w − w_global||² over the LoRA weights (`ProximalTerm`).
With `train.padding-free` (or `train.packing`) a batch is one row of concatenated examples:
`flattened_batches` refuses a model whose attention would let them see each other, and computes
SDPA per example (`per_example_attention`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback, TrainerCallback

from flowertune_llm.client import kept_data
from flowertune_llm.client.imports import hidden_module
from flowertune_llm.client.per_example_attention import per_example_sdpa
from flowertune_llm.shared.devices import training_compute_dtype
from flowertune_llm.shared.settings import TrainSettings

# trl's trainer modules import W&B when it is installed (the `tracking` and `test` extras install
# it): 2-3 s and ~30 MB in every client process, and a deployment starts one per message. Clients
# never log to W&B (the server does, `results.wandb-project`), so trl does not see it here.
with hidden_module("wandb"):
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling


def cosine_learning_rate(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """Return round `server_round`'s learning rate: lr_max in round 1, cosine down to lr_min in the last."""
    if num_rounds <= 1:
        return lr_max
    progress = (server_round - 1) / (num_rounds - 1)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * progress))


def round_seed(base_seed: int, server_round: int, partition_id: int) -> int:
    """Return a seed that differs per round and per client, so dropout and batch order do too."""
    return base_seed + 1_000_003 * server_round + partition_id


def sft_config(
    settings: TrainSettings,
    learning_rate: float,
    seed: int,
    output_dir: str,
    bf16: bool,
    checkpointing: bool,
) -> SFTConfig:
    """Return trl's config for one round of local training."""
    return SFTConfig(
        output_dir=output_dir,
        max_length=settings.seq_length,
        completion_only_loss=True,
        # Packing is trl's (best-fit decreasing, overflow truncated, flattened batches). Held-out
        # loss is taken over the same batches whatever the setting, so it stays comparable.
        packing=settings.packing,
        eval_packing=False,
        # With train.num-devices = N, each of the N processes takes batch_size / N examples of every
        # micro-batch (multi_device.py): the optimizer step still sees batch_size x accumulation.
        per_device_train_batch_size=settings.per_device_batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_steps=settings.max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=settings.max_grad_norm,
        optim=settings.optimizer,
        seed=seed,
        data_seed=seed,
        # trl resolves bf16=None to True even on CPU; say what the model needs.
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        # trl turns checkpointing on by default; the model was already set up as configured.
        activation_checkpointing=checkpointing,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Counted for the tokens/s figure in metrics.json; padding is not work done.
        include_num_input_tokens_seen="non_padding",
        # Several processes (multi_device.py): gloo on the CPU, nccl between GPUs (None: one process;
        # accelerate would look for a process group). Every LoRA weight gets a gradient at every
        # step, so DDP need not search the graph for unused ones.
        ddp_backend=None if settings.num_devices == 1 else "nccl" if torch.cuda.is_available() else "gloo",
        ddp_find_unused_parameters=False,
    )


class FlattenedAttentionError(ValueError):
    """Padding-free or packed batches asked of a model whose attention would mix their examples."""


# Attention implementations that keep the examples of a flattened batch apart. sdpa and eager:
# transformers builds a block-diagonal causal mask from the position ids when there is no attention
# mask and no KV cache (masking_utils.find_packed_sequence_indices; tests/test_padding_free.py
# checks each built-in architecture on CPU). flash_attention_2/3: transformers runs the varlen
# kernel on the cu_seq_lens that trl's collator adds (modeling_flash_attention_utils; read, not run:
# flash-attn is not installed here). Others (flex_attention, hub kernels, custom functions) are
# refused: untested here, and a custom function may ignore both.
FLATTENED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def check_flattened_attention(base: PreTrainedModel, key: str) -> None:
    """Raise unless `base` keeps the examples of a padding-free batch apart (`key` names the setting)."""
    implementation = base.config._attn_implementation
    # The per-example mask is made by transformers' mask builder; model code that does not import it
    # (remote code, older architectures) builds its own mask, which knows nothing of position ids.
    module = sys.modules.get(type(base).__module__)
    builds_mask = module is not None and hasattr(module, "create_causal_mask")
    if implementation in FLATTENED_ATTENTION and builds_mask:
        return
    reason = (f"attention implementation '{implementation}'" if implementation not in FLATTENED_ATTENTION
              else f"{type(base).__name__}, whose code does not build its mask with transformers' create_causal_mask")
    raise FlattenedAttentionError(
        f"{key} = true concatenates a batch's examples into one row, and the model must keep them apart: "
        f"{reason} cannot. Accepted: attention implementation " + ", ".join(FLATTENED_ATTENTION)
        + " in a model built with transformers' own mask code (Llama, Mistral, Qwen2, Phi and most others). "
        f"Set {key} = false to train on padded batches."
    )


def check_flattened_batches(model: PeftModel, settings: TrainSettings) -> None:
    """Raise if `settings` ask for padding-free or packed batches whose examples `model` would mix."""
    if settings.padding_free or settings.packing:
        check_flattened_attention(model.get_base_model(), "train.packing" if settings.packing else "train.padding-free")


@contextmanager
def flattened_batches(model: PeftModel, settings: TrainSettings) -> Iterator[None]:
    """Within the block, `model` trains on padding-free or packed batches if `settings` ask for them.

    Refuses first, before any work, a model that would mix the examples of a flattened row. An
    `sdpa` model computes attention per example meanwhile (per_example_attention.py says why).
    """
    if not (settings.padding_free or settings.packing):
        yield
        return
    check_flattened_batches(model, settings)
    base = model.get_base_model()
    # trl passes use_cache=False to every forward; with a KV cache transformers would not separate
    # the examples, so the model's default says so too (generation asks for the cache per call).
    base.config.use_cache = False
    with per_example_sdpa(base):
        yield


def _chunk_nll_sum(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Return the summed negative log-likelihood of `targets` under the LM head, in fp32, for a chunk."""
    # Under the trainer's bf16 autocast the matmul is bf16 either way; outside it, as the LM head's
    # own input cast does (model.py), bf16 too.
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class ChunkedLossSFTTrainer(SFTTrainer):
    """trl's SFT trainer with the training loss computed a chunk of tokens at a time.

    The loss is the same as trl's (mean fp32 cross-entropy over the completion tokens, divided by
    the tokens of the whole accumulated batch), but at most `chunk_tokens` x vocab logits exist at a
    time: each chunk's LM head and cross-entropy are recomputed in the backward pass instead of
    kept. trl's fused LM head tiles 4096 tokens x 32768 vocabulary entries, and on a CPU (no
    Triton) it scores every position and folds each tile with several tile-sized fp32 temporaries:
    measured, it held more memory there than the full logits did. Evaluation stays trl's.
    """

    def __init__(self, *args, chunk_tokens: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_tokens = chunk_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Return the completion-token loss of the batch, chunk by chunk (trl's own when evaluating)."""
        if not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
        backbone_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "completion_mask")}
        # Accelerate applies mixed precision by wrapping the model's forward, which is bypassed here.
        with self.accelerator.autocast():
            hidden = causal_lm.base_model(**backbone_inputs, use_cache=False).last_hidden_state
            targets = inputs["labels"][:, 1:]
            counted = targets != -100
            hidden, targets = hidden[:, :-1][counted], targets[counted]
            head = causal_lm.get_output_embeddings()
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, targets.numel(), self.chunk_tokens):
                end = start + self.chunk_tokens
                total = total + checkpoint(
                    _chunk_nll_sum, hidden[start:end], targets[start:end], head.weight, head.bias,
                    use_reentrant=False,
                )
        tokens = counted.sum() if num_items_in_batch is None else num_items_in_batch
        return total / torch.as_tensor(tokens, device=total.device).clamp(min=1)


def _trainer(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: TrainSettings,
    learning_rate: float,
    seed: int,
    output_dir: str,
    train_data: Dataset,
    compute_loss_func: Callable | None = None,
) -> SFTTrainer:
    """Return trl's trainer for one round on `train_data`, prepared by trl in this round or kept from an earlier one."""
    base = model.get_base_model()
    # A quantized base computes in its compute dtype (bf16 on a GPU, float32 on a CPU: devices.py says
    # why); bf16 autocast runs the LoRA matmuls in bf16 too, while the LoRA weights themselves stay
    # float32 (below).
    quantized = getattr(base, "hf_quantizer", None) is not None
    bf16 = training_compute_dtype() == torch.bfloat16 if quantized else base.dtype == torch.bfloat16
    checkpointing = bool(getattr(base, "is_activation_checkpointing", False))
    chunked = {"chunk_tokens": settings.loss_chunk_tokens} if settings.loss_chunk_tokens else {}
    collator = None
    if settings.padding_free and not settings.packing:
        # trl's own flattening collator, given here rather than through SFTConfig(padding_free=True):
        # that refuses max_length without packing, and the examples must be truncated exactly as the
        # padded ones are. The pad id is never used: a flattened batch is not padded.
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    # trl 1.16 replaces every trainable weight of a quantized model by a bf16 copy when the trainer
    # is built. In bf16, AdamW's step of about lr is rounded away wherever |w| > lr * 2^8: at the
    # reference schedule (5e-5 -> 1e-6) most LoRA entries of a 3B model would never move. The
    # float32 tensors are kept here and put back before the optimizer exists, so the weights and
    # the optimizer state are float32 and the received adapter is not rounded either.
    float32_weights = {name: weight.data for name, weight in model.named_parameters() if weight.requires_grad}
    args = sft_config(settings, learning_rate, seed, output_dir, bf16=bf16, checkpointing=checkpointing)
    # The same data prepared alike in an earlier round of this process (kept_data.py): trl's
    # preparation is skipped and the trainer gets exactly the rows it would have made.
    key = kept_data.preparation_key(train_data, tokenizer, args)
    prepared = kept_data.prepared(key)
    if prepared is not None:
        args.dataset_kwargs = {"skip_prepare_dataset": True}
    trainer = (ChunkedLossSFTTrainer if chunked else SFTTrainer)(
        **chunked,
        model=model,
        args=args,
        train_dataset=train_data if prepared is None else prepared,
        processing_class=tokenizer,
        data_collator=collator,
        compute_loss_func=compute_loss_func,
    )
    if prepared is None:
        kept_data.keep(key, trainer.train_dataset)
    for name, weight in model.named_parameters():
        if name in float32_weights:
            weight.data = float32_weights[name].float()
    # One printed dict per step from every client drowns the server's round summaries.
    trainer.remove_callback(PrinterCallback)
    return trainer


class ProximalTerm(TrainerCallback):
    """FedProx's proximal term (mu/2)·||w − w_global||² over the trainable (LoRA) weights.

    Its gradient, mu·(w − w_global), is added to each trainable weight's gradient once per optimizer
    step, right before the step: exact whatever the gradient accumulation and however the trainer
    scales the loss of micro-batches. It comes after gradient clipping, which bounds the data
    gradient only. The reported training loss stays the data loss, comparable across strategies.
    """

    def __init__(self, model: PeftModel, mu: float) -> None:
        self.mu = mu
        # The global adapter as received (float32, see `_trainer`).
        self.anchors = [(weight, weight.detach().float().clone())
                        for weight in model.parameters() if weight.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Add mu·(w − w_global) to each trainable weight's gradient."""
        with torch.no_grad():
            for weight, anchor in self.anchors:
                if weight.grad is not None:
                    weight.grad.add_((self.mu * (weight.float() - anchor)).to(weight.grad.dtype))


@dataclass
class LocalTraining:
    """Outcome of one client's local training: mean loss, the tokens it trained on, the loop's seconds."""

    loss: float
    tokens: int
    # transformers' `train_runtime`: the training loop alone, without building the trainer and its data.
    loop_seconds: float = 0.0


def train_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train_data: Dataset,
    settings: TrainSettings,
    learning_rate: float,
    seed: int,
    proximal_mu: float = 0.0,
    compute_loss_func: Callable | None = None,
) -> LocalTraining:
    """Train the model's LoRA weights for `settings.max_steps` steps (FedProx's term if `proximal_mu` > 0).

    By default trl computes the loss with its fused LM head, never holding the full logits;
    `compute_loss_func` (transformers' hook, given the full logits) replaces that, as the memory
    report does to measure what the fused head saves.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != settings.num_devices:
        raise RuntimeError(
            f"train.num-devices={settings.num_devices} but this process is one of {world_size}: training on several "
            "devices runs in processes that multi_device.train_on_devices starts"
        )
    with flattened_batches(model, settings), tempfile.TemporaryDirectory(prefix="flowertune-train-") as output_dir:
        trainer = _trainer(
            model, tokenizer, settings, learning_rate, seed, output_dir, train_data=train_data,
            compute_loss_func=compute_loss_func,
        )
        if proximal_mu > 0:
            trainer.add_callback(ProximalTerm(model, proximal_mu))
        output = trainer.train()
        return LocalTraining(loss=float(output.training_loss), tokens=int(trainer.state.num_input_tokens_seen),
                             loop_seconds=float(output.metrics.get("train_runtime", 0.0)))


def evaluate_loss(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, eval_data: Dataset, settings: TrainSettings
) -> float:
    """Return the mean response-token loss of the model on held-out data."""
    with flattened_batches(model, settings), tempfile.TemporaryDirectory(prefix="flowertune-eval-") as output_dir:
        # SFTTrainer insists on a training set; it is never trained on here, so the held-out data is
        # that set, prepared once (and kept, kept_data.py) as an evaluation set is: never packed.
        trainer = _trainer(model, tokenizer, evaluation_settings(settings), 0.0, settings.seed, output_dir,
                           train_data=eval_data)
        trainer.eval_dataset = trainer.train_dataset
        return float(trainer.evaluate()["eval_loss"])


def evaluation_settings(settings: TrainSettings) -> TrainSettings:
    """Return the settings of a trainer that only evaluates: one process, examples unpacked, batches as in training.

    Held-out loss runs in this one process, also on a client that trains on several devices. trl
    evaluates packed training on unpacked examples (`eval_packing=False`) in flattened batches, as
    padding-free training does.
    """
    return dataclasses.replace(settings, num_devices=1, packing=False,
                               padding_free=settings.padding_free or settings.packing)
