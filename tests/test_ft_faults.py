"""ft.py's faults: each stops with one line (exit status 1, no traceback) and leaves every file as it was;
a run directory is reused, resumed or skipped only for the configuration it records, by one process at a time."""


import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import snapshot

import ft
import lora

ROOT = Path(__file__).resolve().parents[1]
T = ["--task", "cb", "--max_train_samples", "16", "--max_eval_samples", "16", "--eval_batch_size", "16",
     "--max_len", "64"]  # CB's pairs at 64 tokens: half the work of 128, every fault the same



def ft_cli(*argv, wait=True):
    cmd = [sys.executable, "ft.py", *map(str, argv)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_error(p, match):
    err = p.stderr.strip()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "\n" not in err and err.startswith("error: ") and match in err, err


def refused(argv, match, folder, main=ft.main):
    """main(argv) stops with one `error:` line containing `match`, and nothing under folder changes."""
    before = snapshot(folder)
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and match in msg, msg
    assert snapshot(folder) == before
    return msg


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "fin"
    res = ft.main([*T, "--epochs", "1", "--output_dir", str(out)])
    assert res["finished"] and (out / "run.json").exists()
    return out


def fake_head(path, **change):
    """An lp_head.pt as lp.py writes it for CB on the embedded model, with `change` applied."""
    g = torch.Generator().manual_seed(0)
    h = {"weight": torch.randn(3, 384, generator=g), "bias": torch.zeros(3), "task": "cb",
         "model": "all-MiniLM-L6-v2", "labels": ["entailment", "contradiction", "neutral"], "C": 1.0,
         "max_len": 64, "pooling": "cls"} | change
    torch.save(h, path)
    return str(path)


# ---------------------------------------------------------------- bad flags: nothing is deleted, even with --overwrite
@pytest.mark.parametrize("flags,match", [
    (["--epochs", "0"], "--epochs 0: must be > 0"),
    (["--patience", "-1"], "--patience -1: must be >= 0"),
    (["--batch_size", "0"], "--batch_size 0: must be > 0"),  # not silently Table 6's
    (["--max_len", "2"], "--max_len 2: too short"),
    (["--max_len", "600"], "exceeds the 512 positions"),
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--lr", "nan"], "--lr nan"),
    (["--eval_batch_size", "0"], "--eval_batch_size 0"),
    (["--max_train_samples", "0"], "--max_train_samples 0"),
    (["--max_train_samples", "-1"], "--max_train_samples -1"),
    (["--max_steps", "0"], "--max_steps 0"),
    (["--warmup_ratio", "1"], "--warmup_ratio 1.0"),
    (["--head_scale", "nan"], "--head_scale nan"),
    (["--task", "nope"], "unknown task 'nope'"),
])
def test_bad_flag_with_overwrite_keeps_the_finished_run(finished, flags, match):
    refused([*T, "--epochs", "1", "--output_dir", str(finished), "--overwrite", *flags], match, finished)


@pytest.mark.parametrize("change,flags,match", [
    ({"weight": [[0.0] * 384] * 3}, [], "its weight is a list, not a float tensor"),
    ({"weight": torch.full((3, 384), float("nan"))}, [], "its weight has NaN or infinite values"),
    ({"bias": torch.tensor([0.0, float("inf"), 0.0])}, [], "its bias has NaN or infinite values"),
    ({"pooling": "mean"}, ["--pooling", "cls"], "was fit with --pooling mean, not cls"),
    ({"max_len": 64}, ["--max_len", "128"], "was fit with --max_len 64, not 128"),
    ({}, ["--head_scale", "nan"], "--head_scale nan"),
])
def test_bad_head_keeps_the_finished_run(finished, tmp_path, change, flags, match):
    head = fake_head(tmp_path / "lp_head.pt", **change)
    refused([*T, "--init", head, "--output_dir", str(finished), "--overwrite", *flags], match, finished)


def test_head_flags_come_from_the_head_only_when_not_given(tmp_path):
    args = ft.make_parser().parse_args(["--init", fake_head(tmp_path / "h.pt", max_len=64, pooling="mean")])
    ft.resolve(args, "lp_ft", ft.TABLE6, ft.MINILM_LR)
    assert (args.task, args.max_len, args.pooling) == ("cb", 64, "mean")


def test_output_path_that_is_or_lies_under_a_file(tmp_path):
    (tmp_path / "f.txt").write_text("mine")
    refused([*T, "--output_dir", str(tmp_path / "f.txt")], "is a file; pass a folder", tmp_path)
    refused([*T, "--output_dir", str(tmp_path / "f.txt" / "run")], "lies under the file", tmp_path)


def test_corrupt_results_and_unrecorded_dirs_are_refused(finished, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(finished, bad)
    (bad / "results.json").write_text('{"config": ')
    refused([*T, "--epochs", "1", "--output_dir", str(bad)], "a corrupt results file", bad)
    old = tmp_path / "old"  # an older kit's directory: results without run.json
    shutil.copytree(finished, old)
    (old / "run.json").unlink()
    refused([*T, "--epochs", "1", "--output_dir", str(old)], "but no run.json", old)


# ---------------------------------------------------------------- the record decides: skip, refuse, replace
def test_finished_run_and_another_configuration(finished, tmp_path, data_dir, capsys):
    msg = refused([*T, "--epochs", "2", "--output_dir", str(finished)], "another configuration", finished)
    assert "epochs: 1 -> 2" in msg and "--overwrite" in msg
    refused(["--task", "cb", "--epochs", "10", "--output_dir", str(finished)], "epochs: 1 -> 10; eval_batch_size",
            finished)
    refused([*T, "--epochs", "1", "--output_dir", str(finished)], "method: 'ft' -> 'lora'", finished, lora.main)
    same, other = tmp_path / "same", tmp_path / "other"  # the data's content counts, not its folder
    for d in (same, other):
        shutil.copytree(data_dir / "superglue/CB", d / "superglue/CB")
    with open(other / "superglue/CB/val.jsonl", "a") as f:
        f.write((data_dir / "superglue/CB/val.jsonl").read_text().splitlines()[0] + "\n")
    before = snapshot(finished)
    ft.main([*T, "--epochs", "1", "--output_dir", str(finished), "--data_dir", str(same)])
    assert "already finished" in capsys.readouterr().out and snapshot(finished) == before
    refused([*T, "--epochs", "1", "--output_dir", str(finished), "--data_dir", str(other)], "data_sha256.test",
            finished)


def test_overwrite_replaces_another_configuration(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    res = ft.main([*T, "--epochs", "1", "--seed", "7", "--output_dir", str(out), "--overwrite"])
    assert res["config"]["seed"] == 7 and json.loads((out / "run.json").read_text())["seed"] == 7
    assert res["config"]["data_sha256"] == json.loads((finished / "run.json").read_text())["data_sha256"]


def test_head_counts_by_content_not_path(tmp_path, capsys):
    out, a, b = tmp_path / "run", tmp_path / "a.pt", tmp_path / "b.pt"
    ft.main([*T, "--epochs", "1", "--init", fake_head(a), "--output_dir", str(out)])
    shutil.copy(a, b)
    before = snapshot(out)
    ft.main([*T, "--epochs", "1", "--init", str(b), "--output_dir", str(out)])
    assert "already finished" in capsys.readouterr().out and snapshot(out) == before
    refused([*T, "--epochs", "1", "--init", fake_head(b, bias=torch.ones(3)), "--output_dir", str(out)],
            "init_sha256", out)


def test_divergence_says_which_checkpoint_is_kept(tmp_path, monkeypatch):
    save = ft.save_checkpoint

    def save_then_diverge(*a):  # epoch 1 ends well; from epoch 2 on every loss is NaN
        save(*a)
        monkeypatch.setattr(ft.F, "cross_entropy", lambda x, y: x.sum() * float("nan"))

    monkeypatch.setattr(ft, "save_checkpoint", save_then_diverge)
    with pytest.raises(SystemExit, match="loss became nan at epoch 2.*the checkpoint after epoch 1 is kept"):
        ft.main([*T, "--epochs", "2", "--output_dir", str(tmp_path)])
    assert (tmp_path / "ckpt.pt").exists()
    assert json.loads((tmp_path / "results.json").read_text())["failed"].startswith("loss became nan at epoch 2")


# ---------------------------------------------------------------- real processes: kill -9, resume, two writers
def test_killed_run_resumes_only_with_its_own_flags(tmp_path):
    out = tmp_path / "run"
    argv = [*T, "--epochs", "2", "--output_dir", out]
    p = ft_cli(*argv, wait=False)
    try:
        while not (out / "ckpt.pt").exists() and p.poll() is None:
            time.sleep(0.01)
    finally:
        p.kill()  # SIGKILL: no cleanup runs
        p.communicate()
    assert p.returncode == -signal.SIGKILL and not (out / "results.json").exists()
    before = snapshot(out)
    lr = ft.MINILM_LR["cb"]["ft"]  # the default: the embedded model's grid choice for CB
    assert_one_line_error(ft_cli(*argv, "--lr", str(2 * lr)), f"lr: {lr} -> {2 * lr}")
    assert snapshot(out) == before
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = out / f".ckpt.pt.{dead.pid}.tmp"  # as a kill -9 during the checkpoint write leaves it
    orphan.write_bytes(b"half a checkpoint")
    done = ft_cli(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after epoch 1" in done.stdout and not orphan.exists() and not (out / "ckpt.pt").exists()
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and [h["epoch"] for h in res["history"]] == [0, 1, 2] and res["config"]["lr"] == lr


def test_second_writer_stops_and_first_finishes(tmp_path):
    out = tmp_path / "run"
    argv = [*T, "--epochs", "1", "--output_dir", out]
    first = ft_cli(*argv, wait=False)
    try:
        while first.poll() is None and not ((out / ".lock").exists() and
                                            (out / ".lock").read_text().strip() == str(first.pid)):
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock for as long as the second one needs
        second = ft_cli(*argv)
        assert_one_line_error(second, f"is being written by process {first.pid}")
    finally:
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert json.loads((out / "results.json").read_text())["finished"]


def test_cli_bad_flag_with_overwrite_is_one_line(finished):
    before = snapshot(finished)
    assert_one_line_error(ft_cli(*T, "--epochs", "1", "--output_dir", finished, "--overwrite", "--lr", "-1"),
                          "--lr -1.0: must be > 0")
    assert snapshot(finished) == before


def test_resume_state_after_every_epoch_but_the_last_and_one_estimate(tmp_path, monkeypatch, capsys):
    saved, save = [], ft.save_checkpoint

    def counting(s, hist, *rest):
        saved.append(hist[-1]["epoch"])
        save(s, hist, *rest)

    monkeypatch.setattr(ft, "save_checkpoint", counting)
    res = ft.main([*T, "--epochs", "3", "--output_dir", str(tmp_path)])
    assert saved == [1, 2] and res["finished"] and not (tmp_path / "ckpt.pt").exists()
    out = capsys.readouterr().out
    assert out.count("estimated total: ") == 1 and " for 3 epochs of " in out
