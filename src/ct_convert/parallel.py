"""Ordered, bounded parallel map: torch releases the GIL in its kernels, so threads share the cores."""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Working memory allowed to items in flight: with many cores, `workers` large modules at once could
# need more memory than the machine has; one item always runs, whatever its size.
IN_FLIGHT_BYTES = 1 << 30


@contextmanager
def one_torch_thread_per_worker(workers: int) -> Iterator[None]:
    """With several workers, each runs its torch kernels on one thread while this is entered: the
    workers are the parallelism, and every worker's kernels also fanning out to all cores oversubscribes
    them (measured 2-10x more CPU time per kernel on a busy 2-core machine, from OpenMP threads spinning)."""
    if workers <= 1:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    cost: Callable[[T], int] = lambda item: 0,
    budget: int = IN_FLIGHT_BYTES,
) -> Iterator[R]:
    """Yield fn(item) in order, computing ahead at most `workers` items whose estimated working
    memory `cost` adds up to at most `budget` bytes (bounding memory whatever the core count)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        in_flight = 0
        for item in items:
            c = cost(item)
            while pending and (len(pending) >= workers or in_flight + c > budget):
                future, done_cost = pending.popleft()
                in_flight -= done_cost
                yield future.result()
            pending.append((pool.submit(fn, item), c))
            in_flight += c
        while pending:
            yield pending.popleft()[0].result()
