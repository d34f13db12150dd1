"""Which targets each module can be repacked to, and why not: asked of the writers themselves."""

from __future__ import annotations

from ct_convert.qweight import ModuleInfo
from ct_convert.targets import TABLE, writer_for
from ct_convert.targets.writer_base import RepackOptions


def module_targets(info: ModuleInfo) -> tuple[dict[str, bool], dict[str, str]]:
    targets, reasons = {}, {}
    for t in (t.name for t in TABLE if t.inspect):
        why = writer_for(t).refusal(info, RepackOptions(target=t))
        targets[t] = why is None
        if why:
            reasons[t] = why
    return targets, reasons
