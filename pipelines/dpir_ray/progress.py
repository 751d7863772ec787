"""Progress display and the workers' event log: plain Python (no GStreamer, no Ray)."""

import sys
import time


def fmt_time(s):
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class EventLog:
    """A Ray actor (made one by the driver, on the driver's node): workers push small events
    (kind, chunk, attempt token, …) without waiting, the driver drains them."""

    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def drain(self):
        items, self.items = self.items, []
        return items


class Progress:
    """One bar for the whole film; lines for events above it."""

    def __init__(self, total, done_before, interval, out=None):
        self.out = out or sys.stdout
        self.total, self.before = total, done_before
        self.tty = self.out.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.t0 = None
        self.finished = 0  # frames of chunks finished in this run
        self.running = {}  # chunk id -> (token, frames done)
        self.last = 0.0

    def line(self, text):
        if self.tty:
            self.out.write("\r\033[K")
        print(text, file=self.out, flush=True)
        if self.tty:
            self.draw(force=True)

    def bar(self):
        done_now = self.finished + sum(f for _, f in self.running.values())
        done = min(self.total, self.before + done_now)
        pct = 100.0 * done / max(1, self.total)
        elapsed = time.monotonic() - self.t0 if self.t0 else 0.0
        fps = done_now / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / fps if fps > 0 else None
        width = 30
        fill = int(width * done / max(1, self.total))
        return (
            f"[{'#' * fill}{'-' * (width - fill)}] {done}/{self.total} frames {pct:5.1f}% "
            f"{fps:.2f} frames/s ETA {fmt_time(eta) if eta is not None else '?'}"
            f" ({len(self.running)} chunk{'s' if len(self.running) != 1 else ''} running)"
        )

    def draw(self, force=False):
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        if self.tty:
            self.out.write("\r\033[K" + self.bar())
            self.out.flush()
        else:
            print(self.bar(), file=self.out, flush=True)

    def close(self):
        if self.tty:
            self.out.write("\r\033[K")
        print(self.bar(), file=self.out, flush=True)
