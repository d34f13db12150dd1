"""ct-convert: rewrite compressed-tensors checkpoints into other engines' native layouts, exactly."""

__version__ = "0.1.0"
