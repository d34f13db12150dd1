"""Which targets each module can be repacked to, and why not: asked of the writers themselves."""

from __future__ import annotations

from ct_convert.qweight import ModuleInfo
from ct_convert.writers import WRITERS, RepackOptions

TARGET_ORDER = ("dense", "awq", "gptq", "marlin", "trtllm", "trtllm-legacy", "gguf", "mlx")


def module_targets(info: ModuleInfo) -> tuple[dict[str, bool], dict[str, str]]:
    targets, reasons = {}, {}
    names = [t for t in TARGET_ORDER if t in WRITERS] + sorted(set(WRITERS) - set(TARGET_ORDER))
    for t in names:
        why = WRITERS[t].refusal(info, RepackOptions(target=t))
        targets[t] = why is None
        if why:
            reasons[t] = why
    return targets, reasons


def module_details(info: ModuleInfo) -> dict[str, dict]:
    """Per target, what the module would become there, for the targets that say (modelopt: its quant_algo)."""
    out = {}
    for t, writer in sorted(WRITERS.items()):
        details = getattr(writer, "details", None)
        found = details(info, RepackOptions(target=t)) if details else None
        if found:
            out[t] = found
    return out
