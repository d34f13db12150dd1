import threading
import time

from ct_convert.parallel import ordered_map


def test_results_come_in_order_with_at_most_workers_in_flight():
    lock = threading.Lock()
    running, peak = [0], [0]

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01 * (5 - i % 5))  # later items finish first
        with lock:
            running[0] -= 1
        return i * i

    assert list(ordered_map(work, range(12), 3)) == [i * i for i in range(12)]
    assert 2 <= peak[0] <= 3


def test_one_worker_runs_inline():
    seen = []
    assert list(ordered_map(lambda i: seen.append(threading.current_thread()) or i, range(3), 1)) == [0, 1, 2]
    assert set(seen) == {threading.current_thread()}


def _peak(costs, workers, budget):
    lock = threading.Lock()
    running, peak = [0], [0]

    def work(c):
        with lock:
            running[0] += c
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= c
        return c

    assert list(ordered_map(work, costs, workers, cost=lambda c: c, budget=budget)) == costs
    return peak[0]


def test_the_memory_budget_caps_what_runs_at_once_whatever_the_worker_count():
    assert _peak([600] * 6, workers=8, budget=1000) == 600  # one at a time
    assert _peak([300] * 9, workers=8, budget=1000) <= 900
    assert _peak([5000, 10, 10], workers=8, budget=1000) == 5000  # an item over budget still runs, alone
    assert _peak([10] * 20, workers=4, budget=1000) <= 40  # small items: the worker count binds
