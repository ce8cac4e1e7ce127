"""--precision and --batching reach the training step and the run record (issue 26): on a CPU, the dtype the step's
forward runs in, and what run.json / lp_results.json / ntk_results.json record."""

import json
import sys

import pytest
import torch
from conftest import ROOT

import ft
import lp
import ntk

sys.path.insert(0, str(ROOT / "tools"))
import random_model  # noqa: E402

RUN = ["--task", "rte", "--max_train_samples", "16", "--max_eval_samples", "8", "--batch_size", "8", "--epochs", "1",
       "--max_len", "32", "--lr", "1e-4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(random_model.write(tmp_path_factory.mktemp("model") / "tiny", "tiny"))


@pytest.fixture
def step_dtypes(monkeypatch):
    """The dtype of the head's output in every training step (the forward under the step's autocast)."""
    seen, real = [], ft.train_step

    def spy(fwd, opt, sched, params, batch, y, precision=None):
        h = fwd.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        try:
            return real(fwd, opt, sched, params, batch, y, precision)
        finally:
            h.remove()
    monkeypatch.setattr(ft, "train_step", spy)
    return seen


def test_precision_and_batching_reach_the_step_and_the_record(tiny, tmp_path, step_dtypes):
    runs = [([], torch.float32, "fp32", "length"),  # a CPU's defaults
            (["--precision", "bf16", "--batching", "random"], torch.bfloat16, "bf16", "random")]
    for flags, dtype, precision, batching in runs:
        out = tmp_path / precision
        step_dtypes.clear()
        res = ft.main([*RUN, "--model", tiny, "--output_dir", str(out), *flags])
        assert step_dtypes and set(step_dtypes) == {dtype}
        rec = json.loads((out / "run.json").read_text())
        assert (rec["precision"], rec["batching"]) == (precision, batching) and res["history"][1]["loss"] > 0
    for flags, key in [(["--precision", "bf16"], "precision"), (["--batching", "random"], "batching")]:
        with pytest.raises(SystemExit, match=key):  # the fp32 run's directory: another configuration
            ft.main([*RUN, "--model", tiny, "--output_dir", str(tmp_path / "fp32"), *flags])


def test_lp_and_ntk_record_precision(tiny, tmp_path):
    """LP's features are cached per precision; ntk.py's rank tolerance follows the precision (a CPU has no TF32)."""
    common = ["--task", "rte", "--model", tiny, "--max_len", "32"]
    cache = tmp_path / "cache"
    for p in ("fp32", "bf16"):
        res = lp.main([*common, "--max_train_samples", "16", "--max_eval_samples", "8", "--C", "1",
                       "--precision", p, "--output_dir", str(tmp_path / f"lp_{p}"), "--cache_dir", str(cache)])
        assert res["fingerprint"]["precision"] == p
    assert sorted(d.name.rsplit("_", 1)[1] for d in (cache / "rte").iterdir()) == ["bf16", "fp32"]
    res = ntk.main([*common, "--n", "4", "--precision", "fp32", "--output_dir", str(tmp_path / "ntk")])
    assert res["config"]["precision"] == "fp32" and res["config"]["rank_rtol"] == 1e-4
