"""What a training run reports as it goes: the progress bar or plain lines, ``log.csv`` and TensorBoard (rank 0).

``log.csv`` is streamed: the logger keeps only the rows of the latest step in memory (an evaluation row that a
roll-back logs again replaces its twin among them), so a run's memory does not grow with its log, and a resumed run
copies the earlier rows it keeps instead of reading them all in."""

from __future__ import annotations

import csv
import itertools
import math
import os
import sys
from typing import Any, Dict, Iterable, List, Optional

from ..fileio import atomic_write


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _filled(row: Dict[str, Any]) -> set:
    """The columns a row has values for (a row read back from the CSV has every column, the empty ones '')."""
    return {k for k, v in row.items() if v not in ("", None)}


def _is_training_row(row: Dict[str, Any]) -> bool:
    return row.get("loss") not in ("", None)


class Logger:
    """Progress bar (or, when the output is not a terminal, one plain line per logged step), CSV and TensorBoard on
    rank 0; a no-op elsewhere.

    ``log.csv`` has one column per value ever logged (training rows and evaluation rows, which carry different
    values, share the header; a value a row lacks is empty); it is rewritten, streamed from the file, when a new
    column appears. A resumed run keeps the rows up to the step it resumes from and drops the later ones, which the
    resumed run logs again (so does TensorBoard: its events after that step are purged)."""

    def __init__(self, out_dir: str, enabled: bool, total: int, start: int, tensorboard: bool):
        self.enabled = enabled
        self.bar = None
        self._tb = None
        if not enabled:
            return
        self.total = total
        os.makedirs(out_dir, exist_ok=True)
        self.csv_path = os.path.join(out_dir, "log.csv")
        self._fields: List[str] = ["step"]
        self._tail: List[Dict[str, Any]] = []  # the latest step's rows, as logged
        self._last_training: Dict[str, Any] = {}
        self._keep_rows_to(start)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run logs the steps after ``start`` again (a fresh start in a used folder: all of them),
                # so the events a killed or earlier run wrote for them go
                self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start + 1)
            except Exception:  # tensorboard not installed: CSV only
                self._tb = None
        if sys.stderr.isatty():  # a scheduler's log file gets plain lines: a bar there is one endless line of redraws
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")

    def _keep_rows_to(self, start: int) -> None:
        """An earlier run's ``log.csv`` keeps its rows of steps up to ``start``, copied as they are (rows without a
        step number, e.g. a line a killed run left half-written, go too), and its header when a row is kept."""
        if not os.path.isfile(self.csv_path):
            self._write([])
            return
        with open(self.csv_path, newline="") as source:
            reader = csv.reader(source)
            header = next(reader, None) or ["step"]

            def kept():
                for values in reader:
                    row = dict(zip(header, values + [""] * (len(header) - len(values))))
                    if row.get("step", "").isdigit() and int(row["step"]) <= start:
                        self._join_tail(row)
                        if _is_training_row(row):
                            self._last_training = row
                        yield values

            rows = kept()
            first = next(rows, None)
            if first is not None:
                self._fields = list(header)
            self._write(itertools.chain([first] if first is not None else [], rows))

    def _join_tail(self, row: Dict[str, Any]) -> None:
        """``row`` joins the latest step's rows; a row of a later step leaves them behind, in the file."""
        if self._tail and str(self._tail[0]["step"]) != str(row["step"]):
            self._tail = []
        self._tail.append(row)

    def _write(self, rows: Iterable[List[Any]]) -> None:
        """``log.csv`` written anew, atomically: the header, then ``rows`` (values in the header's order; a row of
        fewer columns, written before a column was added at the end, is padded)."""
        width = len(self._fields)

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(self._fields)
                for values in rows:
                    writer.writerow(list(values[:width]) + [""] * (width - len(values)))

        atomic_write(self.csv_path, write)

    def _rewrite(self) -> None:
        """``log.csv`` under the current header: the file's rows of earlier steps than the latest, streamed (their
        columns are a prefix of the header: new ones are added at the end), then the latest step's rows from memory
        (whether or not their writes succeeded). A file removed or replaced meanwhile loses its rows, not the run."""
        latest = ([r.get(k, "") for k in self._fields] for r in self._tail)
        step = int(self._tail[0]["step"])
        try:
            source = open(self.csv_path, newline="")
        except FileNotFoundError:
            self._write(latest)
            return
        with source:
            reader = csv.reader(source)
            header = next(reader, None) or []
            at = header.index("step") if "step" in header else None
            earlier = (values for values in reader
                       if at is not None and at < len(values) and values[at].isdigit() and int(values[at]) < step)
            self._write(itertools.chain(earlier, latest))

    def log(self, step: int, values: Dict[str, Any], show: bool = True) -> None:
        """A row of ``log.csv`` (and TensorBoard); ``show``: also on the bar, or as a line of its own."""
        if not self.enabled:
            return
        row = {"step": step, **values}
        # a row of the same step and values replaces it (an evaluation that a roll-back runs again); rows are in step
        # order and none is later than this step, so that step's rows are the tail
        self._join_tail(row)
        kept = [r for r in self._tail[:-1] if _filled(r) != _filled(row)]
        replaced = len(kept) < len(self._tail) - 1
        self._tail = kept + [row]
        if _is_training_row(row):
            self._last_training = row
        new = [k for k in row if k not in self._fields]
        if new or replaced:
            self._fields += new
            self._rewrite()
        else:
            try:
                with open(self.csv_path, "a", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self._fields)
                    if not f.tell():  # (removed meanwhile: a file of its own)
                        writer.writeheader()
                    writer.writerow(row)
            except OSError as exc:  # (e.g. a full disk: the error alone names no file)
                if exc.filename is not None:
                    raise
                raise OSError(exc.errno, f"writing {self.csv_path}: {exc.strerror or exc}") from exc
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k.replace(".", "/"), v, step)
        if not show:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()
                 if k in ("loss", "lr", "samples_per_s", "mfu") or k.endswith(("_loss", "_acc"))}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
        else:
            print(f"step {step}/{self.total}: " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def last_training_row(self) -> Dict[str, float]:
        """The latest row with a loss (a training row), numbers as numbers: a resumed run's rows include those
        before it resumed."""
        row = self._last_training if self.enabled else {}
        return {k: _number(v) for k, v in row.items() if k != "step" and v not in ("", None)}

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self, text: Optional[str] = None) -> None:
        """Close the bar, then print ``text`` (the run's last line, under the bar rather than above it)."""
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if text:
                print(text, flush=True)
            if self._tb is not None:
                self._tb.close()
                self._tb = None
