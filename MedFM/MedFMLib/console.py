"""What the command line prints while it works: progress on a terminal, and one-line notes and errors."""

from __future__ import annotations

import sys


class SliceProgress:
    """Propagation progress on one stderr line."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr

        self.shown = False

    def __call__(self, done: int, total: int, plane) -> None:
        if self.stream.isatty():
            self.stream.write(f"\rpropagating: {done}/{total} slices (at slice {plane.index})")
            self.stream.flush()
            self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")


class StepProgress:
    """Progress of a counted task on one stderr line: ``label [####    ] done/total``."""

    def __init__(self, label: str, stream=None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.stream.isatty() or total <= 0:
            return
        bar = "#" * int(30 * done / total)
        self.stream.write(f"\r{self.label} [{bar:<30}] {done}/{total}")
        self.stream.flush()
        self.shown = _UNFINISHED_LINE[0] = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")
            _UNFINISHED_LINE[0] = False


class ProgressBar:
    """A download progress bar on stderr (bytes, total, rate)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.shown = False

    def __call__(self, progress) -> None:
        if not self.stream.isatty():  # a log file gets no carriage-return animation
            return
        mib = progress.bytes_done / 2**20
        rate = progress.bytes_per_second / 2**20
        if progress.bytes_total:
            fraction = progress.bytes_done / progress.bytes_total
            bar = "#" * int(fraction * 30)
            text = f"\rdownloading [{bar:<30}] {fraction:6.1%} {mib:8.1f} MiB {rate:6.1f} MiB/s"
        else:
            text = f"\rdownloading {mib:8.1f} MiB {rate:6.1f} MiB/s"
        self.stream.write(text)
        self.stream.flush()
        self.shown = _UNFINISHED_LINE[0] = True
        if progress.bytes_total and progress.bytes_done >= progress.bytes_total:
            self.stream.write("\n")
            _UNFINISHED_LINE[0] = False


#: whether a progress bar left its line open: an error must start on a line of its own
_UNFINISHED_LINE = [False]


def note(text: str) -> None:
    print(f"medfm: {text}", file=sys.stderr, flush=True)


def error(text: str) -> None:
    print(("\n" if _UNFINISHED_LINE[0] else "") + f"medfm: error: {text}", file=sys.stderr)


def human_size(size_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size_bytes < 1024:
            return f"{size_bytes:.0f} {unit}" if unit == "B" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024
    return f"{size_bytes:.2f} GiB"
