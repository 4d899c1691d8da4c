"""The client side: the quantized PEFT model, the node's data, local training and exact match."""
