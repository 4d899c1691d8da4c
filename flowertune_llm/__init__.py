"""FlowerTune LLM: federated LoRA instruction tuning of quantized causal language models with Flower."""
