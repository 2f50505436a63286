"""Reading tuning logs (TVM's JSON database) safely: every line is checked before TVM parses it.

A log directory holds ``database_workload.json`` (one ``[shash, base64 module]`` per line) and
``database_tuning_record.json`` (one ``[workload index, [trace, run_secs, target, args_info]]``
per line); the workload file may be xz-compressed (``database_workload.json.xz``: it holds whole
kernels, ~0.5 MB each, and compresses ~35x), as shipped in ``tuning_logs/``. A line that is not
that, a workload without turbotvm's attribute (another tool's log) or one written by another
turbotvm log format or TVM version raises ``TuningLogError`` naming the file and the line,
instead of reaching TVM's parser (which aborts on bad input).
"""

from __future__ import annotations

import base64
import binascii
import json
import lzma
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms

from .workload import ATTR, FORMAT

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
WORKLOADS_XZ = WORKLOADS + ".xz"
#: meta-schedule records a failed build or run with this run time.
FAILED_SECONDS = 1e9


class TuningLogError(ValueError):
    """A tuning log that cannot be used: names the file and line, and what was expected."""

    def __init__(self, path, line: int | None, problem: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"tuning log {where}: {problem}")
        self.path, self.line = Path(path), line


@dataclass
class LoggedWorkload:
    line: int
    meta: dict
    json_obj: list  # as stored: [shash, base64 module]
    records: list = field(default_factory=list)  # [(line, mean seconds, json of the record)]

    def best(self):
        """(line, seconds, record json) of the fastest successful record, or None."""
        ok = [r for r in self.records if r[1] < FAILED_SECONDS]
        return min(ok, key=lambda r: r[1]) if ok else None


def _tvm_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def workload_file(log_dir) -> Path:
    """The workload file of ``log_dir``: plain if present (tuning writes it), else the shipped ``.xz``."""
    plain = Path(log_dir) / WORKLOADS
    return plain if plain.is_file() or not (Path(log_dir) / WORKLOADS_XZ).is_file() else Path(log_dir) / WORKLOADS_XZ


def expand_compressed(log_dir) -> None:
    """Write the plain workload file next to a shipped ``.xz`` one, for TVM's database (tuning resumes)."""
    path = workload_file(log_dir)
    if path.name == WORKLOADS_XZ:
        (Path(log_dir) / WORKLOADS).write_text(_read_text(path))


def _read_text(path: Path) -> str:
    try:
        if path.name.endswith(".xz"):
            with lzma.open(path, "rt") as f:
                return f.read()
        return path.read_text()
    except UnicodeDecodeError as err:
        raise TuningLogError(path, None, f"not a text file ({err})") from None
    except (lzma.LZMAError, EOFError) as err:
        raise TuningLogError(path, None, f"not a complete xz file ({err})") from None


def _lines(path: Path):
    text = _read_text(path)
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise TuningLogError(path, number, f"invalid JSON ({err.msg} at column {err.colno})") from None


def _workload_meta(path: Path, number: int, entry) -> dict:
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)
            and entry[0].lstrip("-").isdigit()):
        raise TuningLogError(path, number, "expected a workload [structural hash, base64 module]")
    try:
        base64.b64decode(entry[1], validate=True)
    except (binascii.Error, ValueError):
        raise TuningLogError(path, number, "the module is not valid base64") from None
    try:
        mod = ms.database.Workload.from_json(entry).mod
    except Exception as err:  # TVM's own error types: a module it cannot read
        raise TuningLogError(path, number, f"TVM cannot read the module ({str(err).splitlines()[0][:200]})") from None
    funcs = [f for _, f in mod.functions_items()]
    raw = funcs[0].attrs.get(ATTR) if len(funcs) == 1 and funcs[0].attrs else None
    if raw is None:
        raise TuningLogError(path, number, f"not a turbotvm workload (no {ATTR!r} attribute: another tool's log?)")
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError:
        raise TuningLogError(path, number, f"the {ATTR!r} attribute is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise TuningLogError(path, number, f"written as format {found!r}, this turbotvm reads {FORMAT!r}")
    if _tvm_minor(str(meta.get("tvm", "?"))) != _tvm_minor(tvm.__version__):
        raise TuningLogError(path, number, f"tuned with TVM {meta.get('tvm')}, this is TVM {tvm.__version__}: "
                                           "re-tune (traces do not carry across TVM versions)")
    missing = [k for k in ("kernel", "arch", "target_kind", "kernel_hash", "bucket") if k not in meta]
    if missing:
        raise TuningLogError(path, number, f"the {ATTR!r} attribute lacks {missing}")
    return meta


def _record(path: Path, number: int, entry, workloads: int):
    def bad(problem):
        return TuningLogError(path, number, problem)

    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)):
        raise bad("expected a record [workload index, [trace, run_secs, target, args_info]]")
    index, body = entry
    if not 0 <= index < workloads:
        raise bad(f"workload index {index} is outside the {workloads} workloads of {WORKLOADS}")
    if not (isinstance(body, list) and len(body) == 4):
        raise bad("expected [trace, run_secs, target, args_info] after the workload index")
    trace, run_secs, target, args_info = body
    if not (isinstance(trace, list) and len(trace) == 2 and all(isinstance(x, list) for x in trace)):
        raise bad("the trace is not [instructions, decisions]")
    if not (isinstance(run_secs, list) and run_secs
            and all(isinstance(s, (int, float)) and s >= 0 for s in run_secs)):
        raise bad("run_secs is not a non-empty list of non-negative numbers")
    if not (isinstance(target, dict) and isinstance(target.get("kind"), str)):
        raise bad("the target is not a dict with a 'kind'")
    if not isinstance(args_info, list):
        raise bad("args_info is not a list")
    return index, sum(run_secs) / len(run_secs)


def read_log(log_dir) -> list[LoggedWorkload]:
    """Every workload of the log in ``log_dir`` with its records, after checking each line."""
    log_dir = Path(log_dir)
    workload_path, record_path = workload_file(log_dir), log_dir / RECORDS
    workloads = [LoggedWorkload(number, _workload_meta(workload_path, number, entry), entry)
                 for number, entry in (_lines(workload_path) if workload_path.is_file() else ())]
    if record_path.is_file():
        for number, entry in _lines(record_path):
            index, seconds = _record(record_path, number, entry, len(workloads))
            workloads[index].records.append((number, seconds, entry[1]))
    elif workloads:
        raise TuningLogError(record_path, None, f"missing, but {WORKLOADS} next to it names {len(workloads)} workloads")
    return workloads


def rewrite_log(log_dir, keep) -> int:
    """Keep only the workloads for which ``keep(LoggedWorkload)`` is true, with their records
    (re-indexed); the workload file keeps its form (plain or xz). Returns the workloads dropped."""
    log_dir = Path(log_dir)
    workloads = read_log(log_dir)
    kept = [w for w in workloads if keep(w)]
    if len(kept) == len(workloads):
        return 0
    index_of = {w.line: i for i, w in enumerate(kept)}
    text = "".join(json.dumps(w.json_obj) + "\n" for w in kept)
    path = workload_file(log_dir)
    records = "".join(json.dumps([index_of[w.line], body]) + "\n"
                      for w in kept for _, _, body in sorted(w.records, key=lambda r: r[0]))
    for target, content in ((path, text), (log_dir / RECORDS, records)):
        tmp = target.with_name(target.name + ".tmp")
        if target.name.endswith(".xz"):
            with lzma.open(tmp, "wt", preset=9) as f:
                f.write(content)
        else:
            tmp.write_text(content)
        tmp.replace(target)  # atomic: a reader sees the old file or the new one
    return len(workloads) - len(kept)


def validate_log_dir(log_dir) -> None:
    """Raise TuningLogError if ``log_dir`` holds a log this turbotvm cannot use (tuning resumes only valid logs)."""
    read_log(log_dir)


def records_of(database, workload_mod) -> list:
    """The TuningRecords ``database`` holds for ``workload_mod`` (failed ones included)."""
    if not database.has_workload(workload_mod):
        return []
    workload = database.commit_workload(workload_mod)
    return [r for r in database.get_all_tuning_records() if r.workload.same_as(workload)]


def mean_seconds(record) -> float:
    return sum(float(s) for s in record.run_secs) / len(record.run_secs) if record.run_secs else float("inf")


def best_seconds(records) -> float | None:
    times = [mean_seconds(r) for r in records if mean_seconds(r) < FAILED_SECONDS]
    return min(times) if times else None
