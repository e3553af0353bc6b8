"""Whether a sweep's driver is alive: it refreshes a heartbeat in ``sweep.json`` while it runs, so
``sdetr sweep status`` tells a running sweep from one whose driver died (killed, its machine lost)
without any process of its own.

The record carries ``driver: {host, pid, heartbeat}``. A sweep is alive while its status is
"running" and its heartbeat is younger than `STALE_AFTER_S`; on the driver's own machine a pid that
no longer exists says it at once.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from sdetr.platform.layout import SWEEP_RECORD
from sdetr.platform.storage import Location

INTERVAL_S = 10.0
STALE_AFTER_S = 6 * INTERVAL_S  # a few missed beats: a busy machine or a slow store is not a death


class Heartbeat:
    """Writes ``record`` (with a fresh ``driver`` entry) to ``<sweep>/sweep.json`` now and every
    `INTERVAL_S` seconds from a daemon thread, until `stop`; `finish` writes the final status."""

    def __init__(self, sweep: Location, record: dict[str, Any], interval_s: float = INTERVAL_S):
        self.sweep = sweep
        self.record = dict(record)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._run, name="sdetr-sweep-heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        with self._lock:
            now = time.time()
            self.record["driver"] = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": now}
            self.sweep.write_json(SWEEP_RECORD, self.record)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except OSError as exc:  # the store is briefly away: the next beat tries again
                print(f"warning: sweep heartbeat not written to {self.sweep}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s)

    def finish(self, status: str) -> None:
        """The sweep's final status ("finished", "killed", "failed"), in place of "running"."""
        self.stop()
        with self._lock:
            self.record["status"] = status
            self.sweep.write_json(SWEEP_RECORD, self.record)


def driver_state(record: dict[str, Any], now: float | None = None) -> tuple[str, str]:
    """``(status, detail)`` of a sweep from its record: "running" only while its driver is alive, else
    "stopped" with why (the saved status is "running" but the driver is gone)."""
    status = record.get("status", "?")
    if status != "running":
        return status, ""
    driver = record.get("driver") or {}
    beat = driver.get("heartbeat")
    if beat is None:
        return "running", "(no heartbeat recorded: a sweep started by an older sdetr)"
    age = (now or time.time()) - float(beat)
    if driver.get("host") == socket.gethostname() and not _pid_alive(int(driver.get("pid", 0))):
        return "stopped", f"(its driver, pid {driver.get('pid')}, is gone; last heartbeat {age:.0f} s ago)"
    if age > STALE_AFTER_S:
        return "stopped", f"(no heartbeat from its driver on {driver.get('host')} for {age:.0f} s)"
    return "running", ""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
