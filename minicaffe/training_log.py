"""Caffe training logs (glog lines from `caffe train` or `minicaffe train --log`) as tables.

The rows are those of Caffe's tools/extra/parse_log.py: one per iteration that printed net
outputs, with NumIters, Seconds (since the "Solving" line), LearningRate and one column per
output (loss, accuracy, ...), for the train net and the test net apart.
"""
import collections
import csv
import datetime
import io
import math
import os
import re

from .proto_io import atomic_write

__all__ = ["LogFormatError", "parse_log", "write_tables", "table_paths", "read_table"]

_ITERATION = re.compile(r"Iteration (\d+)")
_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
_LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
_GLOG_TIME = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{1,6})\b")


class LogFormatError(ValueError):
    """The file is not a Caffe training log."""


def _line_time(line, year):
    m = _GLOG_TIME.match(line.strip())
    if m is None:
        return None
    month, day, hour, minute, second, micro = (int(g) for g in m.groups())
    return datetime.datetime(year, month, day, hour, minute, second, micro)


def parse_log(path):
    """(train_rows, test_rows) of the log at `path`: lists of OrderedDicts, as parse_log.py."""
    path = os.fspath(path)
    year = datetime.datetime.fromtimestamp(os.path.getctime(path)).year
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    start = next((_line_time(line, year) for line in lines if "Solving" in line), None)
    if start is None:
        raise LogFormatError(f"{path}: no 'Solving' line; not a Caffe training log (write one "
                             f"with `minicaffe train --log FILE` or Caffe's GLOG_log_dir)")
    iteration, rate, last = -1, math.nan, start
    tables = {"train": ([], [None]), "test": ([], [None])}
    for line in lines:
        m = _ITERATION.search(line)
        if m:
            iteration = float(m.group(1))
        if iteration == -1:
            continue   # nothing counts before the first iteration
        when = _line_time(line, year)
        if when is None:
            continue   # not a glog line (a resumed solver's prints, a traceback, ...)
        if when.month < last.month:   # the log ran over new year
            year += 1
            when = _line_time(line, year)
        last = when
        seconds = (when - start).total_seconds()
        m = _LEARNING_RATE.search(line)
        if m:
            rate = float(m.group(1))
        for kind, regex in (("train", _TRAIN_OUTPUT), ("test", _TEST_OUTPUT)):
            _add_output(regex, tables[kind], line, iteration, seconds, rate)
    result = []
    for rows, _ in tables.values():
        # The rate is printed after the first outputs; the first row borrows the second's.
        if len(rows) > 1:
            rows[0]["LearningRate"] = rows[1]["LearningRate"]
        result.append(rows)
    return tuple(result)


def _add_output(regex, table, line, iteration, seconds, rate):
    """Put one `... net output #k: name = value` into the row being filled; a row is done
    when it has as many columns as the table's first."""
    rows, pending = table
    m = regex.search(line)
    row = pending[0]
    if m:
        if row is None or row["NumIters"] != iteration:
            if row is not None:
                rows.append(row)
            row = collections.OrderedDict(NumIters=iteration, Seconds=seconds, LearningRate=rate)
        row[m.group(2)] = float(m.group(3))
    if row is not None and rows and len(row) == len(rows[0]):
        rows.append(row)
        row = None
    pending[0] = row


def table_paths(log_path, out_dir):
    """<out_dir>/<log name>.train and .test, as parse_log.py names them."""
    base = os.path.join(os.fspath(out_dir), os.path.basename(os.fspath(log_path)))
    return base + ".train", base + ".test"


def write_tables(log_path, out_dir, train_rows, test_rows, delimiter=","):
    """Write the two CSV tables (a table with no rows is not written); the paths written."""
    written = []
    for path, rows in zip(table_paths(log_path, out_dir), (train_rows, test_rows)):
        if not rows:
            continue
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), delimiter=delimiter,
                                lineterminator="\r\n")   # csv.excel's, as parse_log.py writes
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(path, text.getvalue().encode())
        written.append(path)
    return written


def read_table(path, delimiter=","):
    """A table written by write_tables: {column: [float, ...]}."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    columns = collections.OrderedDict((name, []) for name in (rows[0] if rows else []))
    for row in rows:
        for name in columns:
            columns[name].append(float(row[name]) if row[name] != "" else math.nan)
    return columns
