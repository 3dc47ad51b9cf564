"""Running a test's work in several threads at once."""

import threading


def run_in_threads(fn, count: int) -> list:
    """``fn(i)`` for i < ``count``, each in its own thread, all at once; the exceptions they raised (an error in a
    thread is otherwise only printed)."""
    errors = []

    def run(i):
        try:
            fn(i)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
