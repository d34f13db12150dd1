"""Which config group (if any) claims a module, from the checkpoint alone (compressed-tensors.md §3.3).

Class-name targets ("Linear", "LlamaAttention") cannot be resolved without instantiating the model,
so they only claim modules whose tensors show that they were quantized; exact names and `re:`
patterns are applied as compressed-tensors applies them (`re.match`, exact names first).
"""

from __future__ import annotations

import re
from functools import lru_cache

from ct_convert.readers.config import SchemeGroup


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def name_matches(name: str, target: str) -> bool:
    """Exact name or `re:` pattern; class names never match here."""
    if target.startswith("re:"):
        rx = _regex(target[3:])
        return bool(rx and rx.match(name))
    return name == target


def is_class_target(target: str, module_names: frozenset[str]) -> bool:
    """A target that is neither a pattern nor a module path: a class name such as 'Linear'."""
    return not target.startswith("re:") and "." not in target and target not in module_names


def is_ignored(name: str, ignore: list[str]) -> bool:
    return any(name_matches(name, t) for t in ignore) or any(
        name_matches(f"{name}.weight", t) for t in ignore if not t.startswith("re:")
    )


def explicit_match(name: str, groups: list[SchemeGroup], module_names: frozenset[str]) -> tuple[SchemeGroup | None, str]:
    """(group, 'name' | 'regex') for the first exact-name or regex target that matches, exact names
    first and then patterns, each in alphabetical order; a later group wins a target listed twice."""
    by_target: dict[str, SchemeGroup] = {}
    for g in groups:
        for t in g.targets:
            by_target[t] = g
    for t in sorted(by_target, key=lambda t: ("re:" in t, t)):
        if not is_class_target(t, module_names) and name_matches(name, t):
            return by_target[t], "regex" if t.startswith("re:") else "name"
    return None, ""


def class_candidates(groups: list[SchemeGroup], module_names: frozenset[str]) -> list[SchemeGroup]:
    """Groups that target at least one class name, in config order."""
    out = []
    for g in groups:
        if any(is_class_target(t, module_names) for t in g.targets) and g not in out:
            out.append(g)
    return out
