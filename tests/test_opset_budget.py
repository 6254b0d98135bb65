"""The opset a file is exported at, from the search's size budget to `hirelc export`'s default."""

from __future__ import annotations

import json

import onnx
import pytest
from typer.testing import CliRunner

from hirelc import runs
from hirelc.cli import app
from hirelc.errors import HirelcError
from hirelc.evaluate import Predictors
from hirelc.pipeline import load_or_measure_graph_bytes, search_options, search_stage
from hirelc.policy import get_policy
from hirelc.topology import build_topology
from hirelc.train import load_baseline


def test_a_search_at_opset_25_budgets_int2_bytes_and_resumes_only_at_it(tiny_baseline, copy_run, tiny_search):
    rd = copy_run(tiny_baseline)
    s = search_stage(rd, target_ratio=6.0, overrides=tiny_search, progress=False, latency_budget=False, opset=25)
    assert s["opset"] == 25 and s["budget"]["int2_storage"] is True
    model, mcfg, _ = load_baseline(rd)
    topo = build_topology(model, (1, mcfg.in_chans, mcfg.img_size, mcfg.img_size))
    layers = get_policy(str(rd / runs.POLICY)).resolve(list(topo.layers))
    graph = load_or_measure_graph_bytes(rd, model, topo)
    assert s["predicted_bytes"] == Predictors(model, topo, graph_bytes=graph, int2=True).predict_bytes(layers)
    # compress's staleness check sees the opset: policy.json's options name it
    recorded = runs.read_provenance(rd)[runs.POLICY]["options"]
    assert recorded == runs.options_digest(search_options(6.0, "quick", None, None, 0, tiny_search, False, 25))
    assert recorded != runs.options_digest(search_options(6.0, "quick", None, None, 0, tiny_search, False))
    with pytest.raises(HirelcError, match="belongs to a different search"):  # the state was budgeted at INT2
        search_stage(rd, target_ratio=6.0, overrides=tiny_search, progress=False, latency_budget=False, resume=True)
    with pytest.raises(HirelcError, match="opset 26 is not supported"):
        search_stage(rd, target_ratio=6.0, overrides=tiny_search, progress=False, latency_budget=False, opset=26)


def test_export_defaults_to_the_opset_the_search_budgeted(tiny_run, copy_run):
    rd = copy_run(tiny_run)
    summary = {"opset": 25}
    runs.atomic_write_json(rd / "search.json", summary)
    res = CliRunner().invoke(app, ["export", "-r", str(rd)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["opset"] == 25
    assert onnx.load(str(rd / runs.HIRELC_ONNX)).opset_import[0].version == 25
    before = (rd / runs.HIRELC_ONNX).read_bytes()
    runs.atomic_write_json(rd / "search.json", {"opset": "twenty-five"})
    res = CliRunner().invoke(app, ["export", "-r", str(rd)])
    assert res.exit_code == 2 and "opset 'twenty-five' is not an integer" in res.output
    assert "Traceback" not in res.output and (rd / runs.HIRELC_ONNX).read_bytes() == before
    runs.atomic_write_json(rd / "search.json", [25])
    res = CliRunner().invoke(app, ["export", "-r", str(rd)])
    assert res.exit_code == 2 and "search.json is corrupt (not a JSON object)" in res.output
    res = CliRunner().invoke(app, ["export", "-r", str(rd), "--opset", "21"])  # an explicit opset wins
    assert res.exit_code == 0, res.output
    assert onnx.load(str(rd / runs.HIRELC_ONNX)).opset_import[0].version == 21
