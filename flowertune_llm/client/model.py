"""Base model loading: bitsandbytes quantization, k-bit preparation and the LoRA wrapper.

Clients call `build_peft_model` (a quantized base with trainable LoRA weights). The server calls
`build_adapter_skeleton`, which gives the same adapter structure over a weightless base, so that a
7B server never materialises base weights just to hold and save a few megabytes of adapters.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from flowertune_llm.builtin.models import ensure_builtin_model
from flowertune_llm.client.quantized_cache import cache_entry, save_entry
from flowertune_llm.shared.devices import COMPUTE_DTYPE, training_compute_dtype
from flowertune_llm.shared.registry import BUILTIN_MODEL_NAME, BUILTIN_MODELS
from flowertune_llm.shared.settings import ModelSettings


class ModelSourceError(RuntimeError):
    """The configured model cannot be found locally nor fetched from the hub."""


def resolve_model_path(name: str) -> str:
    """Return what `from_pretrained` should load: the built-in folder, a local folder or a hub id."""
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise ModelSourceError(
                f"model.name: no built-in model '{name}'; built-in models are " + ", ".join(BUILTIN_MODELS)
            )
        return str(ensure_builtin_model(name))
    return name


def load_model_config(settings: ModelSettings) -> PretrainedConfig:
    """Load the model's config only (no weights), failing with advice when it cannot be found."""
    source = resolve_model_path(settings.name)
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelSourceError(
            f"model.name: '{settings.name}' is a local path but not a model folder "
            "(it has no config.json). Give the folder that `save_pretrained` wrote."
        )
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise ModelSourceError(
            f"model.name: '{settings.name}' has no .safetensors weights. Only safetensors checkpoints "
            "are loaded: pickle-based ones (.bin, .pt) can run code when loaded. Convert it with "
            "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)` where you trust it."
        )
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ModelSourceError(
            f"model.name: '{settings.name}' needs code from its repository to load. Such code runs "
            "with your permissions, so it is off: set model.trust-remote-code=true only for a model "
            "whose code you have read."
        ) from error
    except OSError as error:
        raise ModelSourceError(
            f"model.name: cannot load '{settings.name}': it is not a local folder and the "
            "Hugging Face Hub did not provide it (no network, a private repo, or a typo). "
            "Download it where the hub is reachable and set model.name to that folder, or use "
            f"the built-in default model.name='{BUILTIN_MODEL_NAME}'. Cause: {error}"
        ) from error


def quantization_config(settings: ModelSettings) -> BitsAndBytesConfig | None:
    """Return the bitsandbytes config of a training base: 4-bit NF4 or 8-bit, or None for a bf16 base."""
    return bits_config(settings.quantization, training_compute_dtype())


def bits_config(bits: int, compute_dtype: torch.dtype = COMPUTE_DTYPE) -> BitsAndBytesConfig | None:
    """Return the bitsandbytes config for `bits` = 4 (NF4), 8 (LLM.int8()) or 16 (None: no quantization)."""
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def lora_config(settings: ModelSettings) -> LoraConfig:
    """Return the LoRA config of the adapter that clients train and the server averages.

    `target_modules=None` lets peft pick its per-architecture default (`peft-default`): q_proj and
    v_proj on Llama, Mistral and Qwen2; q_proj, v_proj, fc1 and fc2 on Phi.
    """
    return LoraConfig(
        r=settings.lora.r,
        lora_alpha=settings.lora.alpha,
        lora_dropout=settings.lora.dropout,
        target_modules=settings.lora.target_module_list,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    """Load the model's tokenizer, giving it a padding token if it has none (as Llama's lacks)."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(settings.name), trust_remote_code=settings.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _keep_4bit_weights_trainable_on_cpu(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's Linear4bit in eval mode, given an input without
    gradients (an evaluation pass), repacks its weights for an inference-only kernel and uses that
    kernel for every later forward pass, training included. That kernel passes no gradient back
    through the layer: after one evaluation, the LoRA gradients of the first layer were wrong
    (relative error 1.0, measured on the tiny model). A base kept between rounds evaluates and
    then trains again, so training models keep the training layout.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _keep_frozen_embeddings_in_compute_dtype(model: PreTrainedModel) -> None:
    """Undo peft's fp32 copy of the frozen input embedding and LM head, without changing any result.

    `prepare_model_for_kbit_training` upcasts every weight bitsandbytes did not quantize to fp32,
    the embedding and the LM head included: 4 bytes instead of 2 for 2 x vocab x width values
    (+410 MB for OpenLLaMA 3B, +525 MB for 7B). Both are frozen and hold bf16 values, so back in
    bf16 they hold exactly the same numbers; in training the LM head runs under bf16 autocast (trl's
    fused head), which casts an fp32 weight to bf16 anyway, and its input is cast to bf16 here too,
    so a call outside autocast computes the same; the embedding's output is cast to fp32, which is
    what its fp32 copy returned, so the residual stream keeps its precision.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    for module in {embedding, head}:
        if module is not None and module.weight.dtype == torch.float32:
            module.weight.data = module.weight.data.to(COMPUTE_DTYPE)
        # A head's bias (Phi has one) too: outside autocast (generation) a float32 bias next to a
        # bf16 weight and input fails; its values came from the bf16 checkpoint, so none changes.
        bias = getattr(module, "bias", None)
        if bias is not None and bias.dtype == torch.float32:
            bias.data = bias.data.to(COMPUTE_DTYPE)
    embedding.register_forward_hook(lambda module, inputs, output: output.float())
    if head is not None and head is not embedding and head.weight.dtype == COMPUTE_DTYPE:
        head.register_forward_pre_hook(
            lambda module, inputs: tuple(
                value.to(COMPUTE_DTYPE) if torch.is_floating_point(value) else value for value in inputs
            )
        )


def default_device_map() -> dict[str, int | str]:
    """Return the device map that puts a whole model on this process's GPU, or on the CPU."""
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}


def load_inference_base(
    name: str, bits: int, dtype: torch.dtype = COMPUTE_DTYPE, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load a base model for generation or merging: quantized to `bits` (16 = none), not prepared for training."""
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name),
        quantization_config=bits_config(bits),
        dtype=dtype,
        device_map=default_device_map(),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    model.eval()
    return model


def load_quantized_base(settings: ModelSettings, upcast_embeddings: bool = False) -> PreTrainedModel:
    """Load the frozen base model, quantized as configured and prepared for k-bit training.

    `upcast_embeddings=True` keeps peft's fp32 embedding and LM head (the reference's memory use;
    the memory report measures the difference).
    """
    device_map = default_device_map()
    source = resolve_model_path(settings.name)
    entry = cache_entry(settings, source)
    cached = entry is not None and entry.is_dir()
    # A cache entry is quantized already: its config.json carries the quantization (and passing
    # quantization_config=None would override it).
    quantization = {} if cached else {"quantization_config": quantization_config(settings)}
    model = AutoModelForCausalLM.from_pretrained(
        str(entry) if cached else source,
        **quantization,
        dtype=COMPUTE_DTYPE,
        device_map=device_map,
        # Weights from safetensors only: unpickling a .bin checkpoint can execute code.
        use_safetensors=True,
        trust_remote_code=settings.trust_remote_code,
    )
    if entry is not None and not cached:
        save_entry(model, entry)
    _keep_4bit_weights_trainable_on_cpu(model)
    if settings.quantization in (4, 8):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
        if not upcast_embeddings:
            _keep_frozen_embeddings_in_compute_dtype(model)
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    # The KV cache is useless in training and conflicts with gradient checkpointing.
    model.config.use_cache = False
    return model


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Return the distinct last names of the model's linear layers (what LoRA can target)."""
    linear = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, linear)})


def wrap_with_lora(base: PreTrainedModel, settings: ModelSettings) -> PeftModel:
    """Wrap a base model with LoRA as configured, naming the model's layers if a target is missing."""
    try:
        return get_peft_model(base, lora_config(settings))
    except ValueError as error:
        if "target" not in str(error).lower():
            raise
        raise ModelSourceError(
            f"model.lora.target-modules: {settings.lora.target_modules!r} does not fit "
            f"{type(base).__name__}, whose linear layers are named: "
            + ", ".join(linear_module_names(base))
            + ". Use 'all-linear', 'peft-default' or some of those names."
        ) from error


def build_peft_model(settings: ModelSettings, upcast_embeddings: bool = False) -> PeftModel:
    """Return the quantized base wrapped with fresh, trainable LoRA weights."""
    return wrap_with_lora(load_quantized_base(settings, upcast_embeddings), settings)


def build_adapter_skeleton(settings: ModelSettings, seed: int) -> PeftModel:
    """Return a PeftModel whose base has no weights (meta device) and whose LoRA weights are real.

    LoRA A is initialised from `seed` (Kaiming-uniform, peft's default) and LoRA B is zero, so
    the initial global adapter leaves the base model's outputs unchanged.
    """
    model_config = load_model_config(settings)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model_config, trust_remote_code=settings.trust_remote_code)
    model = wrap_with_lora(base, settings)
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter_name in module.active_adapters:
                module.lora_A[adapter_name].to_empty(device="cpu")
                module.lora_B[adapter_name].to_empty(device="cpu")
                module.reset_lora_parameters(adapter_name, init_lora_weights=True)
    return model
