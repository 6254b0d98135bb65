"""Every option's default lives once, in hirelc.options: the command line shows and uses the same values, and the
choices it offers are the ones the library accepts."""

import typer.main

from hirelc import options as O
from hirelc.cli import Importance, Method, SearchPreset, Variant, app
from hirelc.search import PRESETS
from hirelc.studies.ablate import VARIANTS
from hirelc.studies.bench import METHODS


def _defaults(command: str) -> dict:
    cmd = typer.main.get_command(app).commands[command]
    return {p.name: p.default for p in cmd.params}


def test_the_cli_defaults_are_the_dataclass_defaults():
    train, lower, verify = _defaults("train"), _defaults("lower"), _defaults("verify")
    compress, bench, ablate = _defaults("compress"), _defaults("bench"), _defaults("ablate")
    t, lo, v, c = O.TrainConfig(), O.LowerConfig(), O.VerifyConfig(), O.CompressConfig()
    b, a = O.BenchConfig(), O.AblateConfig()
    assert (train["epochs"], train["batch_size"], train["img_size"], train["data"]) == (
        t.epochs, t.batch_size, O.DataOptions().img_size, O.DataOptions().spec)
    assert (lower["epochs"], lower["lr"], str(getattr(lower["importance"], "value", lower["importance"]))) == (
        lo.epochs, lo.lr, lo.importance)
    assert (verify["min_parity"], verify["runs_"], verify["memory"]) == (v.min_parity, v.runs, v.memory)
    assert (compress["epochs"], compress["qat_epochs"], compress["runs_"], compress["target_ratio"],
            compress["data"], compress["model"]) == (c.train_epochs, c.qat_epochs, c.verify_runs, c.target_ratio,
                                                     c.data.spec, c.model)
    assert (bench["runs"], bench["qat_epochs"], bench["target_ratio"]) == (b.runs, b.qat_epochs, b.target_ratio)
    assert (ablate["qat_epochs"], ablate["target_ratio"]) == (a.qat_epochs, a.target_ratio)


def test_the_choices_are_the_ones_the_library_knows():
    assert O.SEARCH_PRESETS == tuple(PRESETS)
    assert METHODS is O.METHODS and VARIANTS is O.VARIANTS
    assert [c.value for c in SearchPreset] == list(O.SEARCH_PRESETS)
    assert [c.value for c in Importance] == list(O.IMPORTANCES)
    assert [c.value for c in Method] == list(O.METHODS) and [c.value for c in Variant] == list(O.VARIANTS)


def test_a_compress_config_refuses_an_unknown_search_preset():
    import pytest

    from hirelc.errors import HirelcError

    with pytest.raises(HirelcError, match="unknown search preset 'forever'"):
        O.CompressConfig(search_preset="forever")
