"""A dependency-free progress bar: ``[#####.....] 120/500 loss 3.21 | 8.1k tok/s | MFU 1.2% | ETA 0:42``.

On a terminal it redraws one line (carriage return); elsewhere (CI logs, files) it prints a full line
every ``every`` updates and at the end, so logs stay readable.
"""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar", "format_duration", "line_plots"]


def format_duration(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressBar:
    """``update(n, **fields)`` advances by ``n`` and shows ``fields`` (floats formatted compactly)."""

    def __init__(self, total: int, desc: str = "", width: int = 24, stream=None, every: int | None = None,
                 start: int = 0):
        self.total, self.desc, self.width = max(1, total), desc, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if every is not None else max(1, self.total // 20)
        self.n = self.start = self._printed = start
        self.t0 = time.perf_counter()
        self.fields: dict[str, object] = {}

    @staticmethod
    def _fmt(v) -> str:
        if isinstance(v, float):
            if v != v:
                return "nan"
            if abs(v) >= 1e4:
                return f"{v / 1e3:.1f}k"
            return f"{v:.4g}"
        return str(v)

    def line(self) -> str:
        frac = min(1.0, self.n / self.total)
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.t0
        done = self.n - self.start
        eta = elapsed / done * (self.total - self.n) if done > 0 else float("nan")
        parts = [f"{self.desc} [{bar}] {self.n}/{self.total}".strip()]
        parts += [f"{k} {self._fmt(v)}" for k, v in self.fields.items()]
        parts.append(f"{format_duration(elapsed)}<{format_duration(eta) if eta == eta else '?'}")
        return " | ".join(parts)

    def update(self, n: int = 1, **fields) -> None:
        self.n += n
        self.fields.update(fields)
        if self.tty:
            self.stream.write("\r" + self.line() + "\033[K")
            self.stream.flush()
        elif self.n - self._printed >= self.every or self.n >= self.total:
            self._printed = self.n
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def line_plots(png, panels: list[tuple[str, str, list[tuple]]], what: str, missing: str) -> str:
    """Save side-by-side line plots to ``png``; returns a one-line message (matplotlib is optional).

    ``panels``: ``(xlabel, ylabel, series)`` each, ``series`` a list of ``(label, xs, ys, style)``; ``what``
    names the plot in the message; ``missing`` says where the numbers are when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: skipped the {what} plot ({missing})"
    fig, axes = plt.subplots(1, len(panels), figsize=(7 + 4 * (len(panels) - 1), 4), squeeze=False)
    for ax, (xlabel, ylabel, series) in zip(axes[0], panels):
        for label, xs, ys, style in series:
            ax.plot(xs, ys, style, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return f"{what} plot: {png}"
