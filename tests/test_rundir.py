"""rundir.py: the one atomic writer (files and folders), orphaned temporaries, the one-writer lock, run records
(and records made before the kit used one data-hash key, which a rerun must still skip)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import snapshot

import data
import lp
import ntk
import rundir


def dead_pid():
    """The pid of a process that has exited (as a writer killed by kill -9 leaves it)."""
    r = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(r.stdout)


def test_atomic_write_leaves_no_temp_on_failure(tmp_path):
    rundir.save_json(tmp_path / "a.json", {"x": 1})

    def boom(t):
        t.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        rundir.atomic(tmp_path / "a.json", boom)
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1} and sorted(p.name for p in tmp_path.iterdir()) \
        == ["a.json"]


def test_run_lock_one_writer_and_orphans(tmp_path):
    orphan = tmp_path / f".ckpt.pt.{dead_pid()}.tmp"
    orphan.write_text("half a checkpoint")
    with rundir.RunLock(tmp_path):
        assert not orphan.exists() and (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        # another process (flock is per open file, so a second lock in this process is a second writer too)
        with pytest.raises(rundir.KitError, match="being written by process"):
            with rundir.RunLock(tmp_path):
                pass
        holder = "import rundir, sys; rundir.RunLock(sys.argv[1]).__enter__()"
        r = subprocess.run([sys.executable, "-c", holder, str(tmp_path)], capture_output=True, text=True,
                           cwd=data.ROOT)
        assert r.returncode == 1 and "KitError" in r.stderr and "being written by process" in r.stderr
    # released: a killed owner's lock is free (the kernel drops a flock with its process)
    r = subprocess.run([sys.executable, "-c", "import rundir, sys, os; rundir.RunLock(sys.argv[1]).__enter__(); "
                        "os.kill(os.getpid(), 9)", str(tmp_path)], cwd=data.ROOT)
    assert r.returncode == -9
    with rundir.RunLock(tmp_path):
        pass


def test_output_dir_and_json_checks(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for p, msg in ((f, "is a file"), (f / "sub", "lies under the file")):
        with pytest.raises(rundir.KitError, match=msg):
            rundir.check_output_dir(p)
    assert rundir.check_output_dir(tmp_path / "new/deeper") == tmp_path / "new/deeper"
    assert rundir.read_json(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text('{"config": ')
    (tmp_path / "list.json").write_text("[]")
    for name in ("bad.json", "list.json"):
        with pytest.raises(rundir.KitError, match="--overwrite"):
            rundir.read_json(tmp_path / name, "results.json")


def test_cli_turns_kit_errors_into_one_line():
    @rundir.cli
    def main(argv=None):
        rundir.die("something is wrong; do this")
    with pytest.raises(SystemExit, match="^error: something is wrong; do this$"):
        main([])


def test_saved_bytes_do_not_depend_on_the_writer(tmp_path):
    """A run records the sha256 of its --init head: the same head written twice (other temp names, other pids) must
    hash the same, or an identical refit would make every LP-FT directory refuse itself."""
    head = {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.zeros(2), "task": "rte", "labels": ["a", "b"]}
    rundir.save_torch(tmp_path / "a" / "lp_head.pt", head)
    rundir.save_torch(tmp_path / "b" / "lp_head.pt", head)
    assert rundir.file_sha256(tmp_path / "a/lp_head.pt") == rundir.file_sha256(tmp_path / "b/lp_head.pt")


def test_describe_diff_one_readable_line_for_every_script():
    h1, h2 = "a" * 64, "b" * 64
    saved = {"lr": 1e-4, "epochs": 3, "model": "m1", "data_sha256": {"train": h1, "test": h1}, "kernel": None}
    now = {"lr": 3e-4, "epochs": 3, "model": "m2", "data_sha256": {"train": h1, "test": h2}}  # kernel missing: unset
    assert rundir.describe_diff(saved, saved) == "" and rundir.describe_diff(saved, now | {"kernel": None}) == \
        rundir.describe_diff(saved, now)
    assert rundir.describe_diff(saved, now) == ("model: 'm1' -> 'm2'; data_sha256.test: 'aaaaaaaaaaaa...' -> "
                                                "'bbbbbbbbbbbb...'; lr: 0.0001 -> 0.0003")
    assert rundir.describe_diff(saved, now | {"seed": 2}, most=2).endswith("(and 2 more)")


def test_atomic_folder_replaces_the_earlier_one_whole(tmp_path):
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "old.txt").write_text("the earlier export")

    def write(t):
        t.mkdir()
        (t / "new.txt").write_text("this export")
    rundir.atomic(dest, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"] and sorted(os.listdir(dest)) == ["new.txt"]

    def boom(t):
        write(t)
        raise OSError("disk full")
    with pytest.raises(OSError):
        rundir.atomic(dest, boom)  # a failed export leaves the earlier one and no temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"] and sorted(os.listdir(dest)) == ["new.txt"]


def test_orphaned_folders_are_found_by_name(tmp_path):
    pid = dead_pid()
    mine = [tmp_path / f".merged.{pid}@{rundir.HOST}.tmp", tmp_path / f".merged.old.{pid}@{rundir.HOST}.tmp"]
    kept = [tmp_path / f".notes.{pid}@{rundir.HOST}.tmp",  # another file's: not asked for
            tmp_path / f".merged.{pid}@other-host.tmp",  # another host's pid means nothing here
            tmp_path / f".merged.{os.getpid()}@{rundir.HOST}.tmp"]  # a live writer's
    for p in mine + kept:
        p.mkdir()
        (p / "config.json").write_text("{}")
    rundir.clean_orphans(tmp_path, "merged")
    assert [p.exists() for p in mine + kept] == [False, False, True, True, True]
    assert rundir.temp_name(tmp_path / "merged").name == f".merged.{os.getpid()}@{rundir.HOST}.tmp"


def test_records_of_an_earlier_kit_read_with_one_data_key():
    h = {"train": "a" * 64, "test": "b" * 64}
    lp_old = {"task": "cb", "data:train": h["train"], "data:test": h["test"]}
    ntk_old = {"task": "cb", "data": h}
    new = {"task": "cb", "data_sha256": h}
    assert rundir.upgrade_record(lp_old) == rundir.upgrade_record(ntk_old) == rundir.upgrade_record(new) == new
    assert lp_old == {"task": "cb", "data:train": h["train"], "data:test": h["test"]}  # the caller's is left alone


def old_keys(path, field, rename):
    """Rewrite a finished run's record as the kit wrote it before data_sha256: what a runs/ folder made then holds."""
    res = json.loads(path.read_text())
    rec = dict(res[field])
    hashes = rec.pop("data_sha256")
    res[field] = rec | rename(hashes)
    path.write_text(json.dumps(res, indent=2))
    return res


def test_runs_recorded_with_the_old_keys_are_skipped(tmp_path, monkeypatch, capsys):
    lp_argv = ["--task", "cb", "--max_train_samples", "16", "--max_eval_samples", "16", "--C", "1",
               "--output_dir", str(tmp_path / "lp"), "--cache_dir", str(tmp_path / "cache")]
    ntk_argv = ["--task", "cb", "--n", "2", "--n_test", "2", "--max_len", "16", "--output_dir", str(tmp_path / "ntk")]
    lp.main(lp_argv)
    ntk.main(ntk_argv)
    old_lp = old_keys(tmp_path / "lp/lp_results.json", "fingerprint", lambda h: {f"data:{s}": v for s, v in h.items()})
    old_ntk = old_keys(tmp_path / "ntk/ntk_results.json", "config", lambda h: {"data": h})
    assert "data:train" in old_lp["fingerprint"] and "data" in old_ntk["config"]
    before = snapshot(tmp_path)

    def boom(*a, **k):
        raise AssertionError("the model was loaded: the run was redone")
    monkeypatch.setattr(data, "load_encoder", boom)
    capsys.readouterr()
    assert lp.main(lp_argv) == old_lp and "already fit" in capsys.readouterr().out
    assert ntk.main(ntk_argv) == old_ntk and "skipping" in capsys.readouterr().out
    assert snapshot(tmp_path) == before  # neither redone nor rewritten
    # the old record still names its cached features (report.py reads them by lp.source)
    assert lp.source("test", old_lp["fingerprint"]) == rundir.file_sha256(data.data_files("cb")["test"])
