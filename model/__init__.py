"""attnserve's model package: pure PyTorch, nothing of serving.

Config, the Llama-family decoder over a paged KV cache, weight loaders (HF
folder, GGUF, dummy), tokenizer and chat template, sampling and detokenization.
"""
