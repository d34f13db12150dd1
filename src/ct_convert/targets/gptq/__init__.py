"""`--target gptq`: the AutoGPTQ / GPTQModel checkpoint (writer.py, reader.py, facts.py)."""
