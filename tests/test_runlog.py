"""The run's log (vlmo_fast.train.runlog.Logger): log.csv's rows and header, replacements, resumes, bounded memory."""

import builtins
import csv
import errno
import random
import re
import tracemalloc

import pytest

from vlmo_fast.train.runlog import Logger


def read(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        return next(reader), [row for row in reader]


class Model:
    """What log.csv should hold: every row in memory, the header the union of the kept rows' columns in order of
    appearance; a row of the latest step with the same columns filled replaces its twin; a resume keeps the rows up
    to its step (and their header, or "step" alone when none is kept)."""

    def __init__(self):
        self.fields, self.rows = ["step"], []

    def log(self, step, values):
        row = {"step": step, **values}
        filled = lambda r: {k for k, v in r.items() if v not in ("", None)}  # noqa: E731
        first = len(self.rows)
        while first and self.rows[first - 1]["step"] == step:
            first -= 1
        self.rows[first:] = [r for r in self.rows[first:] if filled(r) != filled(row)] + [row]
        self.fields += [k for k in row if k not in self.fields]

    def resume(self, start):
        self.rows = [r for r in self.rows if r["step"] <= start]
        if not self.rows:
            self.fields = ["step"]

    def csv(self):
        return self.fields, [["" if r.get(k) is None else str(r[k]) for k in self.fields] for r in self.rows]


@pytest.mark.parametrize("seed", range(6))
def test_log_csv_matches_a_whole_in_memory_log(tmp_path, seed):
    """Random runs of training and evaluation rows, new columns, evaluations logged again at their step, resumes at
    earlier steps: the streamed file equals the log kept whole in memory, and the latest training row is its."""
    rng = random.Random(seed)
    columns = ["loss", "lr", "mlm_acc", "val/itc_acc", "val/tr_r1", "val/the_metric", "itm_loss"]
    model, step = Model(), 0
    logger = Logger(str(tmp_path), True, 1000, 0, False)
    for _ in range(120):
        action = rng.random()
        if action < 0.08 and step:  # a resume at an earlier step (a new logger reads the file back)
            step = rng.randint(0, step)
            model.resume(step)
            logger = Logger(str(tmp_path), True, 1000, step, False)
        elif action < 0.2 and step:  # an evaluation of the latest step (again, or another set of values)
            keys = rng.sample(columns[3:], rng.randint(1, 3))
            values = {k: round(rng.random(), 4) if rng.random() < 0.8 else rng.choice([None, "", "a, \"b\"\nc"])
                      for k in keys}
            model.log(step, values)
            logger.log(step, values, show=False)
        else:  # a training row of a later step, now and then with a column not seen before
            step += rng.randint(1, 3)
            keys = ["loss", "lr"] + rng.sample([c for c in columns if c not in ("loss", "lr")], rng.randint(0, 2))
            values = {k: round(rng.random(), 4) for k in keys}
            model.log(step, values)
            logger.log(step, values, show=False)
        assert read(tmp_path / "log.csv") == model.csv()
        training = [r for r in model.rows if "loss" in r]
        assert logger.last_training_row() == ({k: v if isinstance(v, str) else float(v)
                                               for k, v in training[-1].items() if k != "step" and v not in ("", None)}
                                              if training else {})


def test_a_resume_drops_later_rows_and_a_half_written_line(tmp_path):
    logger = Logger(str(tmp_path), True, 10, 0, False)
    for step in (1, 2, 3):
        logger.log(step, {"loss": step / 10, "lr": 0.1}, show=False)
    logger.log(2 + 1, {"val/the_metric": 0.5}, show=False)
    with open(tmp_path / "log.csv", "a") as f:
        f.write("4,0.4")  # a run killed while writing step 4's row
    resumed = Logger(str(tmp_path), True, 10, 3, False)
    assert read(tmp_path / "log.csv") == (["step", "loss", "lr", "val/the_metric"],
                                          [["1", "0.1", "0.1", ""], ["2", "0.2", "0.1", ""], ["3", "0.3", "0.1", ""],
                                           ["3", "", "", "0.5"]])
    assert resumed.last_training_row() == {"loss": 0.3, "lr": 0.1}
    resumed.log(3, {"val/the_metric": 0.7}, show=False)  # the pending evaluation, run again: it replaces its row
    assert read(tmp_path / "log.csv")[1][-1] == ["3", "", "", "0.7"]
    assert len(read(tmp_path / "log.csv")[1]) == 4
    Logger(str(tmp_path), True, 10, 0, False)  # a fresh start in the same folder: nothing kept
    assert read(tmp_path / "log.csv") == (["step"], [])


def test_memory_does_not_grow_with_the_log(tmp_path):
    """The rows stay in the file: a resumed run of 20,000 logged rows, and 2,000 more rows with a new column (the
    file rewritten), use far less memory than the rows would in memory (about 1 KB each)."""
    values = {f"value_{i}": 0.123456789 * i for i in range(12)}
    with open(tmp_path / "log.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *values])
        writer.writerows([[step, *values.values()] for step in range(1, 20001)])
    tracemalloc.start()
    try:
        logger = Logger(str(tmp_path), True, 30000, 20000, False)
        for step in range(20001, 22001):
            logger.log(step, values, show=False)
        logger.log(22001, {**values, "val/the_metric": 1.0}, show=False)  # a new column: the file rewritten
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, peak
    header, rows = read(tmp_path / "log.csv")
    assert header == ["step", *values, "val/the_metric"] and len(rows) == 22001
    assert rows[0][-1] == "" and rows[-1][0] == "22001" and rows[-1][-1] == "1.0"


def disk_full_for_appends(monkeypatch):
    """Appending to log.csv fails as on a full disk (an OSError that names no file)."""
    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("log.csv") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)


def test_a_log_row_that_cannot_be_written_names_the_file(tmp_path, monkeypatch):
    """A full disk while appending a row of log.csv: the error named no file (checkpoints' writes do)."""
    logger = Logger(str(tmp_path), True, 10, 0, False)
    logger.log(1, {"loss": 1.0}, show=False)
    disk_full_for_appends(monkeypatch)
    with pytest.raises(OSError, match=rf"writing {re.escape(str(tmp_path / 'log.csv'))}: No space left on device"):
        logger.log(2, {"loss": 0.5}, show=False)


def test_a_failed_write_or_a_removed_file_does_not_garble_the_rows_after_it(tmp_path, monkeypatch):
    """The rewrite copies the file's rows of earlier steps (not a count of rows, which a failed append leaves
    wrong) and writes the latest step's from memory; a log.csv removed during the run starts again with a header."""
    logger = Logger(str(tmp_path), True, 10, 0, False)
    logger.log(1, {"loss": 1.0}, show=False)
    with monkeypatch.context() as patch:
        disk_full_for_appends(patch)
        with pytest.raises(OSError):
            logger.log(2, {"loss": 0.5}, show=False)
    assert logger.last_training_row() == {"loss": 0.5}
    logger.log(3, {"loss": 0.25}, show=False)
    logger.log(3, {"val/the_metric": 0.9}, show=False)  # a new column: the file rewritten
    assert read(tmp_path / "log.csv") == (["step", "loss", "val/the_metric"],
                                          [["1", "1.0", ""], ["3", "0.25", ""], ["3", "", "0.9"]])

    (tmp_path / "log.csv").unlink()
    logger.log(4, {"loss": 0.125}, show=False)
    logger.log(5, {"loss": 0.0625}, show=False)
    assert read(tmp_path / "log.csv") == (["step", "loss", "val/the_metric"], [["4", "0.125", ""], ["5", "0.0625", ""]])
    (tmp_path / "log.csv").unlink()
    logger.log(5, {"val/the_metric": 0.95, "val/tr_r1": 0.5}, show=False)  # a rewrite of a removed file
    assert read(tmp_path / "log.csv") == (["step", "loss", "val/the_metric", "val/tr_r1"],
                                          [["5", "0.0625", "", ""], ["5", "", "0.95", "0.5"]])


def test_other_ranks_log_nothing(tmp_path):
    logger = Logger(str(tmp_path / "run"), False, 10, 0, True)
    logger.log(1, {"loss": 1.0})
    logger.write("text")
    logger.close("done")
    assert not (tmp_path / "run").exists() and logger.last_training_row() == {}
