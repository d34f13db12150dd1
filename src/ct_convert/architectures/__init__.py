"""Model architectures, one class each (architectures/base.py), in one table keyed by the HF
`architectures` names of config.json. Adding an architecture is one class and one @register line."""

from __future__ import annotations

from ct_convert.architectures.base import ModelBase, Part

ARCHITECTURES: dict[str, type[ModelBase]] = {}


def register(*hf_names: str):
    def deco(cls: type[ModelBase]) -> type[ModelBase]:
        cls.hf_names = hf_names
        for name in hf_names:
            ARCHITECTURES[name] = cls
        return cls

    return deco


def hf_architecture(config: dict) -> str | None:
    archs = config.get("architectures") or []
    return archs[0] if archs else None


def lookup(config: dict) -> type[ModelBase] | None:
    """The class of config.json's architecture, or None when none is registered."""
    return ARCHITECTURES.get(hf_architecture(config))


def for_gguf(name: str) -> type[ModelBase] | None:
    """The class a GGUF's `general.architecture` names (several HF names may share it)."""
    return next((c for c in ARCHITECTURES.values() if c.gguf_arch_name() == name), None)


from ct_convert.architectures import deepseek, gemma, glm, llama, llama4, phi, qwen  # noqa: E402,F401  (registration)

__all__ = ["ARCHITECTURES", "ModelBase", "Part", "for_gguf", "hf_architecture", "lookup", "register"]
