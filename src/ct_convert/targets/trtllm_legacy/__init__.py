"""TensorRT-LLM's legacy checkpoint for trtllm-build (writer.py with plan, encode, mixed_gemm, names, tp;
reader.py; facts.py)."""
