"""`hirelc results`: a report's content never steers a write outside the plots folder, and --readme keeps
the file's permission bits."""

from __future__ import annotations

import json
import os
import stat

import pytest

from hirelc.errors import HirelcError
from hirelc.studies.results import copy_plots, results_section, write_into

ABS = "<absolute path under tmp_path>"  # replaced by the test's own tmp_path/abs, so nothing escapes into /tmp
HOSTILE = ["../../..", "../../../escaped", ABS, "a/../../b", "..", ".", "", "a\\..\\b", "x\x00y", "..\x00/..",
           "a/b/c"]


def _tree(root):
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("kind", ["bench", "ablation"])
def test_a_hostile_model_name_stays_inside_the_plots_folder(tmp_path, name, kind, bench_report, ablation_report):
    base = tmp_path / "a" / "b" / "c"  # three levels below tmp_path, so "../../.." would still land in it
    run = base / "run"
    run.mkdir(parents=True)
    rep = bench_report() if kind == "bench" else ablation_report()
    absolute = tmp_path / "abs"
    rep["model"]["name"] = str(absolute) if name == ABS else name
    (run / f"{kind}.json").write_text(json.dumps(rep))
    (run / f"{kind}.md").write_text("# md\n")
    (run / "fig.png").write_bytes(b"\x89PNG fake")
    plots = base / "plots"
    before = _tree(tmp_path)

    figs = copy_plots([run], plots, base)

    new = _tree(tmp_path) - before
    assert new and all((tmp_path / p).resolve().is_relative_to(plots.resolve()) for p in new), sorted(map(str, new))
    folders = [p for p in plots.iterdir()]
    assert len(folders) == 1 and folders[0].is_dir() and folders[0].parent == plots
    assert folders[0].name not in ("", ".", "..") and not folders[0].name.startswith(".")
    assert sorted(p.name for p in folders[0].iterdir()) == sorted([f"{kind}.json", f"{kind}.md", "fig.png"])
    (png,) = figs[run / f"{kind}.json"]
    assert (base / png).resolve().parent == folders[0].resolve()
    assert not any(p.name.startswith("abs") for p in tmp_path.iterdir())
    results_section([run], info={"cpu": "c", "cores": 1, "system": "s", "onnxruntime": "1", "torch": "2"},
                    plots=figs)  # the section still renders with the raw name


def test_a_model_name_that_is_not_a_string_or_a_model_that_is_not_a_dict(tmp_path, bench_report):
    for i, model in enumerate([{"name": ["..", ".."]}, {"name": 7}, "../../x", None]):
        run = tmp_path / f"r{i}"
        run.mkdir()
        rep = bench_report()
        rep["model"] = model
        (run / "bench.json").write_text(json.dumps(rep))
        copy_plots([run], tmp_path / "plots", tmp_path)
    assert all(p.parent == tmp_path / "plots" for p in (tmp_path / "plots").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "r0", "r1", "r2", "r3"]


def test_a_link_planted_in_the_plots_folder_is_refused(tmp_path, bench_report):
    run, plots, outside = tmp_path / "run", tmp_path / "plots", tmp_path / "outside"
    for d in (run, plots, outside):
        d.mkdir()
    (run / "bench.json").write_text(json.dumps(bench_report()))
    (plots / "resnet18-bench").symlink_to(outside, target_is_directory=True)
    with pytest.raises(HirelcError, match="outside the plots folder"):
        copy_plots([run], plots, tmp_path)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("mode", [0o644, 0o664, 0o600, 0o640])
def test_write_into_keeps_the_readme_mode(tmp_path, mode):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n")
    os.chmod(readme, mode)
    write_into(readme, "first")
    assert stat.S_IMODE(readme.stat().st_mode) == mode
    write_into(readme, "second")
    assert stat.S_IMODE(readme.stat().st_mode) == mode
    assert "second" in readme.read_text() and "first" not in readme.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary file left


def test_an_earlier_report_kept_under_the_same_name_is_never_overwritten(tmp_path, bench_report):
    """Two benches of one model: the second goes into a numbered folder, the kept one is untouched, and a kept
    report given again is used in place."""
    plots = tmp_path / "plots"
    old_run, new_run = tmp_path / "old", tmp_path / "new"
    for run, created in ((old_run, "2026-12-01T00:00:00+00:00"), (new_run, "2026-12-02T00:00:00+00:00")):
        run.mkdir()
        rep = bench_report()
        rep["created"] = created
        (run / "bench.json").write_text(json.dumps(rep))
        (run / "fig.png").write_bytes(created.encode())
    copy_plots([old_run], plots, tmp_path)
    kept = {p.name: p.read_bytes() for p in (plots / "resnet18-bench").iterdir()}
    figs = copy_plots([new_run], plots, tmp_path)
    assert {p.name: p.read_bytes() for p in (plots / "resnet18-bench").iterdir()} == kept
    assert (plots / "resnet18-bench-2" / "bench.json").read_bytes() == (new_run / "bench.json").read_bytes()
    assert figs[new_run / "bench.json"] == [(plots / "resnet18-bench-2" / "fig.png").relative_to(tmp_path)]
    # the kept reports given again, or the new run's report again: used where they are kept, nothing new is made
    again = copy_plots([plots / "resnet18-bench", plots / "resnet18-bench-2"], plots, tmp_path)
    assert again[plots / "resnet18-bench" / "bench.json"] == [(plots / "resnet18-bench" / "fig.png")
                                                               .relative_to(tmp_path)]
    copy_plots([new_run], plots, tmp_path)
    assert sorted(p.name for p in plots.iterdir()) == ["resnet18-bench", "resnet18-bench-2"]
    assert {p.name: p.read_bytes() for p in (plots / "resnet18-bench").iterdir()} == kept
