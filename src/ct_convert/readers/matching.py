"""Which config group (if any) claims a module, from the checkpoint alone (compressed-tensors.md §3.3).

Class-name targets ("Linear", "LlamaAttention") cannot be resolved without instantiating the model,
so they only claim modules whose tensors show that they were quantized; exact names and `re:`
patterns are applied as compressed-tensors applies them (`re.match`, exact names first).

Patterns come from the checkpoint, so they are untrusted: each is compiled once, and matched with
the `regex` package (the `re` dialect, plus a timeout) under one time budget for the whole
checkpoint, so that a pattern that backtracks catastrophically (`(a|aa)+$`) is refused naming it
instead of hanging. Their number and length are bounded when the config is parsed (config.py).
"""

from __future__ import annotations

import time
from typing import Iterable

import regex

from ct_convert.errors import InputError
from ct_convert.readers.config import SchemeGroup

MATCH_SECONDS = 10.0  # all pattern matching of one checkpoint, together


class Clock:
    """The time left to the pattern matching of one checkpoint; `where` names its config file."""

    def __init__(self, where: str):
        self.where = where
        self.left = MATCH_SECONDS
        self._compiled: dict[str, regex.Pattern | None] = {}

    def compile(self, target: str) -> regex.Pattern | None:
        """The compiled pattern of a `re:` target, or None where it is invalid (compressed-tensors would
        fail on it too; it matches nothing here). Each pattern is compiled once per checkpoint."""
        if target in self._compiled:
            return self._compiled[target]
        start = time.perf_counter()
        try:
            rx = regex.compile(target[3:])
        except (regex.error, ValueError, OverflowError, RecursionError):
            rx = None
        self.left -= time.perf_counter() - start
        if self.left < 0:
            raise InputError(
                f"{self.where}: compiling pattern {target!r} used up the {MATCH_SECONDS:g} s allowed to all patterns"
            )
        self._compiled[target] = rx
        return rx

    def match(self, rx: regex.Pattern, target: str, name: str) -> bool:
        start = time.perf_counter()
        try:
            found = rx.match(name, timeout=max(self.left, 0.001)) is not None
        except TimeoutError:
            raise InputError(
                f"{self.where}: pattern {target!r} did not finish matching {name!r} in the {MATCH_SECONDS:g} s "
                "allowed to all patterns (catastrophic backtracking?)",
                hint="Rewrite the pattern without nested quantifiers, or list module names instead.",
            ) from None
        self.left -= time.perf_counter() - start
        return found


class Targets:
    """One list of targets (a group's `targets`, an `ignore` list), split once into exact names and
    compiled patterns, kept in the order given."""

    def __init__(self, targets: Iterable[str], clock: Clock):
        self.clock = clock
        self.exact: set[str] = set()
        self.patterns: list[tuple[str, regex.Pattern]] = []
        for t in targets:
            if t.startswith("re:"):
                rx = clock.compile(t)
                if rx is not None:
                    self.patterns.append((t, rx))
            else:
                self.exact.add(t)

    def matches(self, name: str) -> bool:
        """Exact name or `re:` pattern; class names never match here."""
        return name in self.exact or any(self.clock.match(rx, t, name) for t, rx in self.patterns)

    def ignores(self, module: str) -> bool:
        """An ignore list also names modules by their weight (`lm_head.weight`)."""
        return self.matches(module) or f"{module}.weight" in self.exact


class GroupTargets:
    """The exact-name and pattern targets of every config group, indexed once for all modules."""

    def __init__(self, groups: list[SchemeGroup], clock: Clock):
        self.clock = clock
        by_target: dict[str, SchemeGroup] = {}
        for g in groups:
            for t in g.targets:
                by_target[t] = g  # a later group wins a target listed twice
        self.by_name = {t: g for t, g in by_target.items() if not t.startswith("re:")}
        self.patterns = [
            (t, rx, by_target[t]) for t in sorted(by_target) if t.startswith("re:") and (rx := clock.compile(t)) is not None
        ]

    def explicit_match(self, name: str) -> tuple[SchemeGroup | None, str]:
        """(group, 'name' | 'regex') for the first exact-name or regex target that matches, exact names
        first and then patterns in alphabetical order."""
        if name in self.by_name:
            return self.by_name[name], "name"
        for t, rx, g in self.patterns:
            if self.clock.match(rx, t, name):
                return g, "regex"
        return None, ""


def is_class_target(target: str, module_names: frozenset[str]) -> bool:
    """A target that is neither a pattern nor a module path: a class name such as 'Linear'."""
    return not target.startswith("re:") and "." not in target and target not in module_names


def class_candidates(groups: list[SchemeGroup], module_names: frozenset[str]) -> list[SchemeGroup]:
    """Groups that target at least one class name, in config order."""
    out = []
    for g in groups:
        if any(is_class_target(t, module_names) for t in g.targets) and g not in out:
            out.append(g)
    return out
