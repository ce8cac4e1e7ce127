"""tools/gpu_check.sh --dry: the one GPU call, rehearsed on the CPU on tiny configs (issue 29), so the call on a lent
GPU machine cannot fail on a typo. Every part must run and pass, and OUT must hold what comes back from it."""

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = {"env.json", "tests.json", "study.tgz", "bench.json", "ntk_250.json", "ntk_2000.json", "summary.json",
         "log.txt"}


def gpu_check(*args):
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    p = gpu_check(out, "--dry")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return out


def test_every_part_runs_and_passes(dry):
    assert {f.name for f in dry.iterdir()} == FILES  # at most 8 files come back from a device call
    s = json.loads((dry / "summary.json").read_text())
    assert s["dry"] and set(s["parts"]) == {"env", "tests", "study", "bench", "ntk_250", "ntk_2000"}
    assert all(p["status"] == "ok" for p in s["parts"].values()), s["parts"]
    t = json.loads((dry / "tests.json").read_text())
    assert t["complete"] and t["counts"]["passed"] >= 13 and t["counts"]["failure"] == t["counts"]["error"] == 0
    assert t["counts"]["skipped"] == 0  # KIT_TEST_DEVICE=cpu: every CUDA test ran on the CPU


def test_bench_and_kernels_report_their_goals(dry):
    b = json.loads((dry / "bench.json").read_text())
    train = b["synthetic"]["train"]
    assert {"hf_fp32", "hf_bf16", "ft_step", "ft_step_compile", "lora_step"} <= set(train)
    assert b["config"]["peak_tflops_measured"] > 0 and "lp_extract" in b["synthetic"]["infer"]
    assert b["config"]["compile_backend"] == "aot_eager"  # --dry: no Inductor build on the CPU
    assert "profile" in train["ft_step"] and abs(sum(train["ft_step"]["profile"]["share_by_kind"].values()) - 1) < 1e-9
    goals = json.loads((dry / "summary.json").read_text())["goals"]
    assert {"ft_step_vs_hf_bf16", "entk_250_seconds", "entk_2000_seconds"} <= set(goals)
    k = json.loads((dry / "ntk_250.json").read_text())
    assert set(k["methods"]) == {"func", "structured"} and k["methods"]["structured"]["rel_error"] < 1e-4


def test_the_study_is_packed_without_weights(dry):
    with tarfile.open(dry / "study.tgz") as t:
        names = t.getnames()
    assert "study/report.md" in names and not any(n.endswith((".safetensors", "ckpt.pt")) for n in names)
    for m in ("lp", "lp_ft", "lp_lora"):  # --dry: LP-FT and LP-LoRA, so lp.py, ft.py and lora.py run once
        assert f"study/cb/{m}-seed1001/logits.npz" in names
    assert not any(n.startswith("study/cb/ntk-") for n in names)  # --dry: --no_ntk (the tiny study has them)
    assert any(n.endswith("calibration.json") for n in names)


@pytest.mark.parametrize("args, words", [((), "name the folder"), (("--budget", "5", "x"), "--budget '5'"),
                                          (("x", "--bogus"), "unknown option --bogus"), (("a", "b"), "one OUT"),
                                          (("x", "--python", "nopython3"), "no such interpreter")])
def test_bad_options_are_one_line(args, words, tmp_path):
    p = gpu_check(*args)
    assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
