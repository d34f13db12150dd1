"""`--target gguf`: GGUF for llama.cpp and ollama (writer.py with mapping, blocks, vocab; reader.py; facts.py)."""
