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
