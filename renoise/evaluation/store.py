"""The output folder of `renoise eval`: rows as JSON lines, files written atomically, the run's settings.

    out/run.json              the settings (model, methods' plans, seed, ...): a rerun must match them
    out/rows/rank-R.jsonl     one row per (image, method), appended by rank R as each pair finishes
    out/rows.jsonl            all rows, merged and sorted by rank 0 at the end
    out/.lock                 held (fcntl.flock, exclusive) by the run's rank 0 from start to end

One run at a time: a second run into the same folder waits for the lock, then finds the pairs
done. A row carries `input_sha256`, the fingerprint of its pair's inputs (data.fingerprint and
the method's plan); a row whose fingerprint is not the current one is stale: the pair is redone
and the stale row is ignored. A line in a rows file that is not a row is refused, before anything
is written. A row is appended with one write of one line and flushed to disk; a process killed during that
write can leave a torn last line, which readers ignore and the next writer of that file cuts off,
so a row is either whole or absent. Every other file is written to a temporary name and renamed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

from ..presets import Plan

__all__ = ["write_atomic", "write_json", "LineWriter", "RowWriter", "append_line", "read_rows", "check_settings",
           "row_key", "check_folder", "locked", "pair_fingerprint", "LOCK", "STATUSES", "ok_rows", "at_calls"]

ROWS_DIR = "rows"
SETTINGS = "run.json"
LOCK = ".lock"
STATUSES = ("ok", "bad_input", "failed")


def pair_fingerprint(item_fingerprint: str, plan: dict) -> str:
    """The fingerprint of one (image, method) pair: the item's and the method's resolved plan."""
    return hashlib.sha256((item_fingerprint + json.dumps(plan, sort_keys=True)).encode()).hexdigest()


def check_folder(out, own=()) -> None:
    """--out must be new, empty, or an eval run (it has run.json): never another folder's files.
    `own`: names eval itself writes before run.json (the data folder of --set)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK and p.name not in own)
    if others and not (out / SETTINGS).is_file():
        listed = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise ValueError(f"--out {out} holds files that renoise eval did not write ({listed}) and no {SETTINGS}; "
                         "pass a new or empty folder")


@contextlib.contextmanager
def locked(out, quiet=False):
    """Hold an exclusive flock on out/.lock (created, with out, if missing) for the block; wait
    while another run holds it. A folder this call created is removed again if the block fails
    before the run wrote its settings. POSIX only (fcntl); on NFS flock needs a lock daemon."""
    import fcntl
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    ok = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                print(f"renoise eval: another run is writing to {out} (it holds {out / LOCK}); waiting for it",
                      file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
        ok = True
    finally:
        os.close(fd)
        if created and not ok and not (out / SETTINGS).exists():
            (out / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()


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


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key in ("image", "method"):
        if not isinstance(row.get(key), str):
            return f"no {key!r} name"
    if row.get("status") not in STATUSES:
        return f"status {row.get('status')!r} is none of {', '.join(STATUSES)}"
    if row["status"] != "ok" and not isinstance(row.get("error"), str):
        return "a row that is not ok without its 'error'"
    return None


def read_rows(out, fingerprints=None, stale=None) -> dict:
    """{(image, method): row} from every rank file under out/rows; whole lines only. With
    `fingerprints` ({pair: input_sha256}), a listed pair's rows of other inputs are left out (and
    the pair added to the set `stale`). The first row of a pair wins, except that a bad-input row
    gives way to a later row (the input was fixed). A line that is not a row raises ValueError."""
    rows = {}
    for path in sorted((Path(out) / ROWS_DIR).glob("rank-*.jsonl")):
        data = path.read_bytes()
        for n, line in enumerate(data[:data.rfind(b"\n") + 1].splitlines(), 1):
            try:
                row = json.loads(line)
                problem = _row_problem(row)
            except (json.JSONDecodeError, UnicodeDecodeError):
                problem = "not JSON"
            if problem:
                raise ValueError(f"{path}, line {n} is not a row of renoise eval ({problem}: "
                                 f"{line[:60].decode('utf-8', 'replace')!r}); remove that line, or pass another --out")
            key = row_key(row)
            if fingerprints is not None and key in fingerprints and row.get("input_sha256") != fingerprints[key]:
                if stale is not None:
                    stale.add(key)
                continue
            old = rows.get(key)
            if old is None or (old["status"] == "bad_input" and row["status"] != "bad_input"):
                rows[key] = row
    if stale is not None:
        stale.difference_update(rows)
    return rows


def at_calls(rows, image, calls, methods, key="latent_psnr", cap=None) -> float:
    """`key` of the curve `methods` (e.g. plain iteration K = 0..9) on `image`, interpolated linearly in
    inversion calls at `calls`: what "at equal calls" means in issue 20's rule (ends held flat beyond the
    curve's calls). rows: ok_rows' {method: {image: row}}; methods missing that image are left out. cap:
    each point's value capped at it first (None: not)."""
    import numpy as np
    pts = sorted((rows[m][image]["calls_invert"], rows[m][image][key]) for m in methods if image in rows.get(m, {}))
    calls_at, values = zip(*pts)
    return float(np.interp(calls, calls_at, values if cap is None else np.minimum(values, cap)))


def ok_rows(out) -> dict:
    """{method: {image: row}} of a finished run's rows with status "ok" (read_rows; what benchmarks tabulate)."""
    rows = {}
    for (image, method), row in read_rows(out).items():
        if row["status"] == "ok":
            rows.setdefault(method, {})[image] = row
    return rows


def check_settings(out, settings: dict) -> None:
    """Write out/run.json, or check that the run already there used the same settings. Methods may
    be added to a run (and images to its data set); a method kept under its name must keep its plan
    (a Plan field added since the run was made counts as its default)."""
    path = Path(out) / SETTINGS
    if not path.is_file():
        write_json(path, settings)
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("methods"), dict):
        raise ValueError(f"{path} is not the settings file of a renoise eval run; pass another --out")
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
