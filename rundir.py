"""Run directories: the kit's errors, its one atomic writer, run records, the one-writer lock and orphaned temp files.

    python -c "import rundir; rundir.save_json('runs/x/a.json', {'x': 1}); print(rundir.read_json('runs/x/a.json'))"
    python -c "import rundir; print(rundir.describe_diff({'lr': 1e-4}, {'lr': 3e-4}))"

Every stage script imports it (and data.py does); it imports neither data.py nor any stage script, so it travels
alone. Every file the kit writes goes through `atomic`: written under `.name.<pid>@<host>.tmp` beside its target, then
renamed, so a crash never leaves a half-written file and `clean_orphans` (run by `RunLock` on entry) recognises the
leftovers of a killed writer.
"""

import errno
import fcntl
import functools
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch


class KitError(Exception):
    """A foreseeable failure. Its message is one line naming the problem and the fix."""


def die(msg):
    """Raise a KitError: library code raises, a script's `main` (wrapped by `cli`) prints the one line."""
    raise KitError(msg)


def cli(main):
    """Wrap a script's main(argv): a KitError becomes `error: <message>` on stderr and exit status 1, with no
    traceback. Functions copied out of a script raise KitError and never exit."""

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except KitError as e:
            raise SystemExit(f"error: {e}") from None

    return run


def check_positive(args, names, allow_zero=()):
    """Flags that must be finite and > 0 (>= 0 for those in allow_zero); None means 'not given'."""
    for n in names:
        v = getattr(args, n, None)
        if v is None:
            continue
        low_ok = v >= 0 if n in allow_zero else v > 0
        if not (math.isfinite(v) and low_ok):
            die(f"--{n} {v}: must be {'>= 0' if n in allow_zero else '> 0'} and finite")


# ---------------------------------------------------------------- the one atomic writer
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def temp_name(path, tag=""):
    """`.name[.tag].<pid>@<host>.tmp` beside path: the pid keeps parallel writers apart and tells clean_orphans
    whether the writer still lives; the host, whose pid it is (a shared file system under a Slurm array)."""
    path = Path(path)
    return path.with_name(f".{path.name}{'.' + tag if tag else ''}.{os.getpid()}@{HOST}.tmp")


def remove(path):
    """Delete a file or a folder (a written-out model directory), if there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic(path, write):
    """write(tmp_path) then rename, so a crash never leaves a half-written file. write may make a folder there
    (lora.py's --merge_to export): an earlier folder at path is moved aside under a temporary name and removed once
    the new one is in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = temp_name(path), temp_name(path, "old")
    try:
        write(tmp)
        if tmp.is_dir() and path.exists():  # os.replace cannot put a folder over a non-empty one
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        remove(tmp)
        remove(old)


def save_json(path, obj):
    atomic(path, lambda t: Path(t).write_text(json.dumps(obj, indent=2)))


def save_npz(path, **arrays):
    def write(t):
        with open(t, "wb") as f:
            np.savez(f, **arrays)
    atomic(path, write)


def save_torch(path, obj):
    def write(t):
        with open(t, "wb") as f:  # a file object: torch.save(name) puts the (temporary) name inside the archive,
            torch.save(obj, f)    # so the same head would hash differently each time it is written
    atomic(path, write)


def load_torch(path, what, fix):
    """A .pt file loaded safely (tensors and plain values only: weights_only) -> its object; a file that cannot be
    read stops with one line ending in `fix`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"cannot read {what} {path} ({type(e).__name__}); {fix}")


def read_json(path, what="file"):
    """A JSON file -> its object, or None when absent; a corrupt one stops with one line."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        die(f"{path}: a corrupt {what} ({type(e).__name__}); delete it, or rerun with --overwrite")
    if not isinstance(obj, dict):
        die(f"{path}: a {type(obj).__name__}, not the {what} this kit writes; delete it, or rerun with --overwrite")
    return obj


def check_output_dir(path, flag="--output_dir"):
    """Before anything is written: the directory (or its first existing parent) must be a writable folder."""
    path = Path(path)
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        what = "is a file" if p == path else f"lies under the file {p}"
        die(f"{flag} {path} {what}; pass a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        die(f"{flag} {path}: {p} is not writable; pass a folder you can write to")
    return path


# ---------------------------------------------------------------- one writer per directory, orphans
def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def clean_orphans(folder, name=None):
    """Remove the temporary files and folders (temp_name) of this host whose writer is dead (a kill -9 during a
    write); with name, only those of that file or folder (in a folder the kit does not own, such as --merge_to's
    parent). Another host's (a shared file system under a Slurm array) are left alone: their pids mean nothing here."""
    for f in Path(folder).glob(f".{glob.escape(name)}.*.tmp" if name else ".*.tmp"):
        m = re.fullmatch(r"\..+\.(\d+)(?:@([A-Za-z0-9-]+))?\.tmp", f.name)
        if not m or f.is_symlink() or m.group(2) not in (None, HOST):
            continue
        if int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            remove(f)


class RunLock:
    """One writer per run directory: an exclusive flock on <dir>/.lock, which holds the owner's pid.
    The kernel drops the lock when its process dies (kill -9 included), so a stale lock is simply taken over.
    wait=False: a second process stops with one line; wait=True: it waits (say, for an LP head another job is
    fitting) and then finds the work done."""

    def __init__(self, folder, wait=False):
        self.folder, self.wait, self.fd = Path(folder), wait, None

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / ".lock"
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            if not self.wait:
                os.close(self.fd)
                die(f"{self.folder} is being written by process {owner}; wait for it to finish, "
                    f"or pass another --output_dir")
            print(f"{self.folder}: waiting for process {owner}, which is writing it", file=sys.stderr)
            t0 = time.time()
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            print(f"{self.folder}: free after {time.time() - t0:.0f}s", file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        clean_orphans(self.folder)
        return self

    def __exit__(self, *exc):
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing releases the flock; the file stays (removing it would race a waiter)
        return False


# ---------------------------------------------------------------- run records
def run_name(method, args):
    """A run directory's name: <method>[-k<K>-data<S>]-seed<seed>."""
    shot = f"-k{args.k_shot}-data{args.data_seed}" if getattr(args, "k_shot", None) else ""
    return f"{method}{shot}-seed{args.seed}"


@functools.lru_cache(maxsize=64)
def _sha256(path, size, mtime_ns, ctime_ns, ino):  # a file edited or replaced in place is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path):
    """A file's content hash, as run records name data files and --init heads (by content, never by path)."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def upgrade_record(rec):
    """A run record with its data hashes under today's one key, data_sha256 {split: sha256}: the kit once recorded
    them as 'data:<split>' keys (lp.py) and as 'data' (ntk.py), and a rerun must still skip or resume those runs."""
    rec = dict(rec)
    old = {k.removeprefix("data:"): rec.pop(k) for k in [k for k in rec if k.startswith("data:")]}
    if isinstance(rec.get("data"), dict):
        old = rec.pop("data")
    if old and "data_sha256" not in rec:
        rec["data_sha256"] = old
    return rec


def config_diff(saved, now):
    """The keys whose values differ between two recorded configurations -> 'key: saved -> now' strings. A key one
    record lacks reads as unset (None): a flag added since does not make an older record differ."""
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in keys
            if saved.get(k) != now.get(k)]


def describe_diff(saved, now, most=3):
    """What differs between two run records, as one readable line for a refusal (ft.py, lora.py, lp.py, ntk.py):
    'key: old -> new' for the first few (task, method and model first), a nested dict's keys as 'key.sub',
    content hashes cut to 12 digits. '' when the records agree."""
    def flat(d):
        out = {}
        for k, v in d.items():
            for k2, v2 in (v.items() if isinstance(v, dict) else [(None, v)]):
                short = isinstance(v2, str) and re.fullmatch(r"[0-9a-f]{64}", v2)
                out[f"{k}.{k2}" if k2 else k] = v2[:12] + "..." if short else v2
        return out

    diff = config_diff(flat(saved), flat(now))
    diff.sort(key=lambda d: d.split(":")[0] not in ("task", "method", "model"))  # what the run is, first
    return "; ".join(diff[:most]) + (f" (and {len(diff) - most} more)" if len(diff) > most else "")
