"""Progress display: a tqdm bar on a terminal, one plain line per epoch otherwise.

The bar advances once per step (no device sync); loss, accuracy and img/s come from the
per-epoch metrics, which the trainer reads at the epoch boundary anyway.
"""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, mode: str, total: int, initial: int = 0, enabled: bool = True,
                 stream=None):
        self.stream = stream or sys.stdout
        if not enabled or mode == "none":
            self.mode = "none"
        elif mode == "auto":
            self.mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        else:
            self.mode = mode
        self.total = total
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=self.stream, leave=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def epoch_done(self, m: dict, n_epochs: int) -> None:
        if self.mode == "none":
            return
        ips = m.get("img_per_s")
        eta = None
        if ips:
            steps_left = self.total - m["step"]
            eta = steps_left * m["epoch_s"] / max(1, m["epoch_steps"])
        parts = [f"epoch {m['epoch']}/{n_epochs}", f"loss {m['train_loss']:.4f}",
                 f"train_acc {m['train_acc']:.4f}"]
        if "test_top1" in m:
            parts.append(f"test_acc {m['test_top1']:.4f}")
        if ips:
            parts.append(f"{ips:,.0f} img/s")
        parts.append(f"timed {m['timed_s']:.1f}s")
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(parts[1:]), refresh=True)
        else:
            if eta is not None and m["step"] < self.total:
                parts.append(f"eta {_fmt_s(eta)}")
            print("  ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
