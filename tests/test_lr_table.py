"""Where a run's default learning rate comes from: the kit's grid for the embedded model, Table 6 otherwise."""

from types import SimpleNamespace

import pytest

import data
import ft
import lora
import rundir


def resolved(method, *argv, table=ft.TABLE6, minilm=ft.MINILM_LR):
    args = ft.make_parser().parse_args(argv)
    ft.resolve(args, method, table, minilm)
    return args


@pytest.mark.parametrize("task", sorted(ft.MINILM_LR))
def test_embedded_model_takes_the_grid_choice_and_table6_batch(task):
    for method, table, minilm in (("ft", ft.TABLE6, ft.MINILM_LR), ("lp_ft", ft.TABLE6, ft.MINILM_LR),
                                  ("lora", lora.TABLE6, lora.MINILM_LR), ("lp_lora", lora.TABLE6, lora.MINILM_LR)):
        a = resolved(method, "--task", task, table=table, minilm=minilm)
        assert (a.lr_table, a.lr, a.batch_size) == ("minilm", minilm[task][method], table[task][method][0])
        a = resolved(method, "--task", task, "--lr_table", "table6", table=table, minilm=minilm)
        assert (a.lr_table, a.lr) == ("table6", table[task][method][1])
        a = resolved(method, "--task", task, "--lr", "3e-4", table=table, minilm=minilm)
        assert (a.lr_table, a.lr) == (None, 3e-4)  # the user's --lr wins


def test_every_grid_choice_is_a_number():
    for minilm in (ft.MINILM_LR, lora.MINILM_LR):
        assert all(isinstance(lr, float) and lr > 0 for t in minilm.values() for lr in t.values())


def test_other_models_and_tasks_fall_back_to_table6(capsys):
    other = SimpleNamespace(task="cb", model="roberta-base", lr_table=None)
    assert ft.default_lr(other, "ft", ft.TABLE6, ft.MINILM_LR) == ("table6", ft.TABLE6["cb"]["ft"][1])
    assert capsys.readouterr().out == ""  # roberta-base's own table: nothing to say
    rte = SimpleNamespace(task="rte", model=data.EMBEDDED, lr_table=None)
    assert "rte" not in ft.MINILM_LR
    assert ft.default_lr(rte, "ft", ft.TABLE6, ft.MINILM_LR) == ("table6", ft.TABLE6["rte"]["ft"][1])
    assert "no MiniLM learning rate for ft on rte" in capsys.readouterr().out
    with pytest.raises(rundir.KitError, match="--lr_table minilm has no ft learning rate for rte.*pass --lr"):
        ft.default_lr(SimpleNamespace(task="rte", model=data.EMBEDDED, lr_table="minilm"), "ft", ft.TABLE6,
                      ft.MINILM_LR)
