"""NVIDIA ModelOpt's unified Hugging Face checkpoint: what TensorRT-LLM's PyTorch backend (LLM API,
`trtllm-serve`) loads natively, and what vLLM and SGLang load for FP8/NVFP4 (`facts.py` holds the
format's facts, `writer.py` writes it, `reader.py` reads it back for `verify`)."""
