"""`--target dense`: a plain Hugging Face checkpoint (writer.py, reader.py)."""
