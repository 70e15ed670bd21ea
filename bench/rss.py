"""Peak resident memory of a benchmarked process, sampled from outside it."""

from __future__ import annotations

import threading

import psutil


class PeakRss:
    """Samples `pid` (with `tree`, its largest descendant too, e.g. a dramatiq worker child)
    every 20 ms until `stop()` or until the process is gone."""

    def __init__(self, pid: int, *, tree: bool = False) -> None:
        self.peak = 0
        self._root = psutil.Process(pid)
        self._tree = tree
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                procs = [self._root, *(self._root.children(recursive=True) if self._tree else ())]
                self.peak = max(self.peak, *(p.memory_info().rss for p in procs))
            except psutil.NoSuchProcess:
                if not self._root.is_running():
                    return
            except psutil.Error:
                pass
            self._stopping.wait(0.02)

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stopping.set()
        self._thread.join(timeout=5)
        return self.peak
