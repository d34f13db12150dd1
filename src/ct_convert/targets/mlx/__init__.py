"""`--target mlx`: MLX / mlx-lm checkpoints (writer.py writes them, reader.py reads them back for
`verify`; facts.py holds the facts both rely on)."""
