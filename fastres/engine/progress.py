"""Progress display: a tqdm bar on a terminal, one plain line per epoch otherwise
(`Progress`, training), and a bar or a line every few seconds for evaluations
(`EvalProgress`, the final evaluation and `fastres eval`).

The bars advance from host-known counts (steps, batch sizes): no device sync. Loss, accuracy
and img/s come from the per-epoch metrics, which the trainer reads at the epoch boundary
anyway.
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

    def epoch_done(self, m: dict, n_epochs: int, steps_per_epoch: int | None = None) -> None:
        """One line per epoch; an epoch of fewer steps than `steps_per_epoch` (resumed
        mid-epoch, or a schedule's fractional last epoch) says how many its figures cover."""
        if self.mode == "none":
            return
        ips = m.get("img_per_s")
        eta = None
        if ips:
            steps_left = self.total - m["step"]
            eta = steps_left * m["epoch_s"] / max(1, m["epoch_steps"])
        epoch = f"epoch {m['epoch']}/{n_epochs}"
        if steps_per_epoch and m["epoch_steps"] < steps_per_epoch:
            epoch += f" ({m['epoch_steps']} of {steps_per_epoch} steps)"
        parts = [epoch, f"loss {m['train_loss']:.4f}", f"train_acc {m['train_acc']:.4f}"]
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


class EvalProgress:
    """Progress of an evaluation (the final one, `fastres eval`): a tqdm bar on a terminal,
    otherwise a plain line when it starts, every `every_s` seconds (images done, img/s, ETA)
    and when it ends, on stderr so that JSON on stdout stays clean.

    `update(n)` takes the batch's image count, which the host knows from the batch shape:
    no device sync. (On a GPU the host runs ahead of the device by the queued work, so the
    ETA is early by at most that much.)
    """

    def __init__(self, mode: str = "auto", total: int | None = None,
                 label: str = "evaluation", every_s: float = 5.0, stream=None, clock=None):
        import time

        self.stream = stream or sys.stderr
        self.clock = clock or time.monotonic
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode, self.total, self.label, self.every_s = mode, total, label, every_s
        self.done = 0
        self.t0 = self.last = self.clock()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=label, dynamic_ncols=True,
                            file=self.stream, leave=False)
        elif self.mode == "plain":
            self._print(f"{label}: started" + (f", {total} images" if total else ""))

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "plain":
            now = self.clock()
            if now - self.last >= self.every_s:
                self.last = now
                self._print(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.label}: {self.done}" + (f"/{self.total}" if self.total else "") +
                 " images"]
        if self.total:
            parts.append(f"{100 * self.done / self.total:.0f}%")
        parts.append(f"{rate:,.0f} img/s")
        if self.total and rate > 0:
            parts.append(f"eta {_fmt_s(max(self.total - self.done, 0) / rate)}")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "plain":
            self._print(f"{self.label}: {self.done} images in {_fmt_s(self.clock() - self.t0)}")
            self.mode = "none"
