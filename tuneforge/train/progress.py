"""A progress bar that shows what a person watching a run wants: loss, tokens/s and ETA."""

from __future__ import annotations

import sys

from tqdm import tqdm


def say(message: str) -> None:
    """One line for the person running the job, on stderr, prefixed ``tuneforge:``."""
    print(f"tuneforge: {message}", file=sys.stderr, flush=True)


class Progress:
    def __init__(self, total: int, start: int = 0, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled:
            # On a terminal, a live bar; in a log file (CI), a line every ~5% instead of \r spam.
            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            mininterval=0.5 if interactive else 30, file=sys.stderr,
                            desc="train", smoothing=0.1)
        self.tokens_per_s: float | None = None

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.bar:
            return
        # exponential smoothing: per-step throughput jumps with the batch's length mix
        ema = self.tokens_per_s
        self.tokens_per_s = tokens_per_s if ema is None else 0.8 * ema + 0.2 * tokens_per_s
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens_per_s:.0f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def note(self, text: str) -> None:
        if self.bar:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
