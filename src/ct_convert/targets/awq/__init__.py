"""`--target awq`: the AutoAWQ GEMM checkpoint (writer.py, reader.py, facts.py)."""
