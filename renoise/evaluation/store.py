"""The output folder of `renoise eval`: rows as JSON lines, files written atomically, the run's settings.

    out/run.json              the settings (model, methods' plans, seed, ...): a rerun must match them
    out/rows/rank-R.jsonl     one row per (image, method), appended by rank R as each pair finishes
    out/rows.jsonl            all rows, merged and sorted by rank 0 at the end

A row is appended with one write of one line and flushed to disk; a process killed during that
write can leave a torn last line, which readers ignore and the next writer of that file cuts off,
so a row is either whole or absent. Every other file is written to a temporary name and renamed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..presets import Plan

__all__ = ["write_atomic", "write_json", "LineWriter", "RowWriter", "append_line", "read_rows", "check_settings",
           "row_key"]

ROWS_DIR = "rows"
SETTINGS = "run.json"


def row_key(row) -> tuple[str, str]:
    return row["image"], row["method"]


def write_atomic(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode())


class LineWriter:
    """Appends JSON objects to a file, one whole line per write (a torn last line is cut off first)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: dict) -> None:
        line = (json.dumps(row, allow_nan=False) + "\n").encode()
        written = os.write(self.fd, line)
        if written != len(line):             # a full disk; never leave the line half there
            raise OSError(f"could not append a whole row to {self.path} ({written} of {len(line)} bytes)")
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)


def RowWriter(out, rank: int) -> LineWriter:
    """The rows file of one rank: out/rows/rank-R.jsonl."""
    return LineWriter(Path(out) / ROWS_DIR / f"rank-{rank}.jsonl")


def append_line(path, obj) -> None:
    writer = LineWriter(path)
    try:
        writer.write(obj)
    finally:
        writer.close()


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write that a killed process did not finish)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_rows(out) -> dict:
    """{(image, method): row} from every rank file under out/rows; whole lines only. The first row of
    a pair wins, except that a bad-input row gives way to a later row (the input was fixed)."""
    rows = {}
    for path in sorted((Path(out) / ROWS_DIR).glob("rank-*.jsonl")):
        data = path.read_bytes()
        for line in data[:data.rfind(b"\n") + 1].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue                     # cannot happen with whole lines; never let one stop a merge
            old = rows.get(row_key(row))
            if old is None or (old["status"] == "bad_input" and row["status"] != "bad_input"):
                rows[row_key(row)] = row
    return rows


def check_settings(out, settings: dict) -> None:
    """Write out/run.json, or check that the run already there used the same settings. Methods may
    be added to a run (and images to its data set); a method kept under its name must keep its plan
    (a Plan field added since the run was made counts as its default)."""
    path = Path(out) / SETTINGS
    if not path.is_file():
        write_json(path, settings)
        return
    old = json.loads(path.read_text())
    defaults = Plan().to_dict()
    for key, value in settings.items():
        if key in ("methods", "peers"):
            continue
        if old.get(key) != value:
            raise ValueError(f"{out} holds an evaluation made with {key} = {old.get(key)!r}, not {value!r}; "
                             "rerun with the same settings to resume it, or pass another --out")
    for name, plan in settings["methods"].items():
        if name in old["methods"] and {**defaults, **old["methods"][name]} != plan:
            raise ValueError(f"{out} holds rows of a method {name!r} with another plan; give the changed method "
                             "a new name, or pass another --out")
    old_peers, peers = old.get("peers", {}), settings.get("peers", {})
    for name, spec in peers.items():
        if name in old_peers and old_peers[name] != spec:
            raise ValueError(f"{out} holds rows of a peer method {name!r} with other settings; give the changed "
                             "method a new name, or pass another --out")
    if set(settings["methods"]) - set(old["methods"]) or set(peers) - set(old_peers):
        merged = {**old, "methods": {**old["methods"], **settings["methods"]}}
        if peers or old_peers:
            merged["peers"] = {**old_peers, **peers}
        write_json(path, merged)
