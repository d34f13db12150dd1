"""Which targets each module can be repacked to, and why not: asked of the writers themselves."""

from __future__ import annotations

from ct_convert.qweight import ModuleInfo
from ct_convert.writers import WRITERS, RepackOptions

TARGET_ORDER = ("dense", "awq", "gptq", "marlin", "trtllm", "modelopt", "gguf")


def module_targets(info: ModuleInfo) -> tuple[dict[str, bool], dict[str, str]]:
    targets, reasons = {}, {}
    names = [t for t in TARGET_ORDER if t in WRITERS] + sorted(set(WRITERS) - set(TARGET_ORDER))
    for t in names:
        why = WRITERS[t].refusal(info, RepackOptions(target=t))
        targets[t] = why is None
        if why:
            reasons[t] = why
    return targets, reasons
