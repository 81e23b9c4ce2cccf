"""The one progress / event protocol of the engine: ``predict``, ``worker``, ``train`` and ``cv`` all
report through :class:`Progress` (a tqdm bar and lines on stderr, JSON lines on stdout, or nothing).

``--progress jsonl`` (and ``ipmn worker`` always) prints one JSON object per line on stdout, flushed at
once, for the Slicer modules (``IPMNClassifierLib.engine``) or any other program to read::

    {"event": "ready", "pid": 1234}                                      worker started
    {"event": "stage", "stage": "preprocess", "message": "", "fraction": 0.2}   predict stages
    {"event": "stage", "stage": "cache", "message": "preprocessing 24 cases", ...}
    {"event": "epoch", "fold": 0, "epoch": 3, "epochs": 30, "train_loss": 0.91, "val_loss": 0.88,
     "val_acc": 0.6, "eta_s": 41.2, ...}
    {"event": "fold_done", "fold": 0, "metrics": {...}}
    {"event": "warning", "message": "..."}
    {"event": "error", "message": "..."}                                a request or command failed
    {"event": "done", "out": "RUN_DIR", ...}                             (predict: "summary"; worker: "prediction")
    {"event": "bye"}                                                     worker stopped

Extra context (``model``, ``inner``, ``lr``) is added by :meth:`Progress.child`. Values that are not
finite (a NaN loss) are written as ``null`` so every line stays valid JSON. ``tqdm`` writes to stderr
and is used only on a terminal (``auto``); ``none`` prints nothing.
"""

from __future__ import annotations

import json
import math
import sys
import time

MODES = ("auto", "tqdm", "jsonl", "none")


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _clean(value.item())
        except (TypeError, ValueError):
            return str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


class Progress:
    """A reporter shared by train and cv. ``mode``: auto | tqdm | jsonl | none."""

    def __init__(self, mode: str = "auto", stream=None, context: dict | None = None, _root=None):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}")
        if mode == "auto":
            mode = "tqdm" if getattr(sys.stderr, "isatty", lambda: False)() else "none"
        self.mode = mode
        self.stream = stream
        self.context = dict(context or {})
        self._root = _root or self
        if _root is None:
            self._bar = None
            self._bar_key = None

    # -------------------------------------------------------------------------------- plumbing
    def child(self, **context) -> Progress:
        """A reporter that adds ``context`` (fold, model, inner ...) to every event."""
        return Progress(self.mode, self.stream, {**self.context, **context}, _root=self._root)

    def emit(self, event: str, **fields) -> None:
        if self.mode != "jsonl":
            return
        record = {"event": event, **_clean({**self.context, **fields})}
        out = self.stream or sys.stdout
        out.write(json.dumps(record) + "\n")
        out.flush()

    def _close_bar(self):
        root = self._root
        if root._bar is not None:
            root._bar.close()
            root._bar = None
            root._bar_key = None

    # -------------------------------------------------------------------------------- events
    def stage(self, stage: str, message: str = "", **fields) -> None:
        """A step began (``fraction``: how far a prediction has got, 0–1)."""
        if self.mode == "jsonl":
            self.emit("stage", stage=stage, message=message, **fields)
        elif self.mode == "tqdm":
            self._close_bar()
            label = " ".join(f"{k}={v}" for k, v in self.context.items())
            print(f"[{stage}]{' ' + label if label else ''} {message}".rstrip(), file=sys.stderr, flush=True)

    def epoch(self, epoch: int, epochs: int, train_loss=None, val_loss=None, val_acc=None, eta_s=None, **fields) -> None:
        if self.mode == "jsonl":
            fields.setdefault("fold", self.context.get("fold"))
            self.emit("epoch", epoch=epoch, epochs=epochs, train_loss=train_loss, val_loss=val_loss,
                      val_acc=val_acc, eta_s=eta_s, **fields)
        elif self.mode == "tqdm":
            from tqdm import tqdm

            root = self._root
            key = (tuple(sorted(self.context.items())), epochs)
            if root._bar is None or root._bar_key != key:
                self._close_bar()
                desc = " ".join(f"{k}={v}" for k, v in self.context.items()) or "train"
                root._bar = tqdm(total=epochs, initial=max(epoch - 1, 0), desc=desc, unit="epoch", file=sys.stderr,
                                 dynamic_ncols=True)
                root._bar_key = key
            bar = root._bar
            if epoch > bar.n:
                bar.update(epoch - bar.n)
            post = {"loss": train_loss}
            if val_loss is not None:
                post["val_loss"] = val_loss
            if val_acc is not None:
                post["val_acc"] = val_acc
            bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in post.items() if v is not None},
                            refresh=False)
            bar.refresh()
            if epoch >= epochs:
                self._close_bar()

    def fold_done(self, fold, metrics: dict, **fields) -> None:
        if self.mode == "jsonl":
            self.emit("fold_done", fold=fold, metrics=metrics, **fields)
        elif self.mode == "tqdm":
            self._close_bar()
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float) and k in
                              ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"))
            label = " ".join(f"{k}={v}" for k, v in self.context.items())
            print(f"fold {fold} done{' (' + label + ')' if label else ''}: {shown}", file=sys.stderr, flush=True)

    def done(self, out, **fields) -> None:
        if self.mode == "jsonl":
            self.emit("done", out=str(out), **fields)
        elif self.mode == "tqdm":
            self._close_bar()
            print(f"done: {out}", file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        """A failure the caller reports (JSON lines only: the CLI prints the ``ipmn: error:`` line itself)."""
        self.emit("error", message=message)

    def warn(self, message: str) -> None:
        if self.mode == "jsonl":
            self.emit("warning", message=message)
        elif self.mode != "none":
            self._close_bar()
            print(f"ipmn: warning: {message}", file=sys.stderr, flush=True)
        else:
            print(f"ipmn: warning: {message}", file=sys.stderr, flush=True)


class EtaClock:
    """Remaining-time estimate from the mean duration of the epochs done so far in this process."""

    def __init__(self):
        self.start = time.perf_counter()
        self.done = 0

    def tick(self, remaining: int) -> float:
        self.done += 1
        per = (time.perf_counter() - self.start) / max(self.done, 1)
        return round(per * max(remaining, 0), 1)
