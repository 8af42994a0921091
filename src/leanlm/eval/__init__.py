"""Evaluation: perplexity / loss on held-out text, zero-shot tasks, agreement with a reference,
the quantization grid and its report; above quant, peft and data, below train and serve."""
