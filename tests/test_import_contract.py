"""The layering of hirelc's modules (.ci/import_contract.py): it holds on the source tree, and it catches each kind
of violation on a small tree made to break it."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "import_contract.py"


@pytest.fixture(scope="module")
def contract():
    spec = importlib.util.spec_from_file_location("import_contract", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_source_tree_keeps_the_contract(contract):
    assert contract.check() == []
    files = contract.module_files()
    assert {"hirelc.kernels.quant", "hirelc.lower.model", "hirelc.export.verify", "hirelc.studies.bench",
            "hirelc.pipeline", "hirelc.cli"} <= set(files)
    assert all(contract.layer_of(m) is not None for m in files)


def test_the_script_exits_0_on_the_tree():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout
    assert "0 violation(s)" in res.stdout


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_each_kind_of_violation_is_reported(contract, tmp_path):
    root = _tree(tmp_path, {
        "t/__init__.py": "",
        "t/policy.py": "from hirelc import pipeline\n",  # core importing the pipeline: upward, and a cycle
        "t/pipeline.py": "from hirelc import policy\n",
        "t/train.py": "def f():\n    from hirelc import models\n",  # function-local import of hirelc
        "t/models.py": "def g():\n    import numpy\n",  # function-local import without a comment
        "t/data.py": "def h():\n    import numpy  # heavy, imported on use\n",  # allowed
        "t/cli.py": "def c():\n    from hirelc import pipeline\n",  # allowed in the cli
        "t/export/__init__.py": "",
        "t/export/verify.py": "from hirelc import train\n",  # export must not use training
        "t/search/__init__.py": "from hirelc import latency\n",  # search must not use the adapters
        "t/latency.py": "",
        "t/stray.py": "",  # in no layer
        "k/__init__.py": "",
        "k/quant.py": "from hirelc import validate\n",  # kernels may import only hirelc.errors
        "t/validate.py": "",
        "t/errors.py": "",
        "t/cost.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\nelse:\n"
                     "    from hirelc import studies\n",  # an else branch of TYPE_CHECKING runs: upward
        "t/studies/__init__.py": "",
    })
    problems = contract.check(root, {"t": "hirelc", "k": "hirelc.kernels"})
    text = "\n".join(problems)
    assert "hirelc.policy (core) imports hirelc.pipeline (pipeline), a layer above it" in text
    assert "import cycle: hirelc.pipeline -> hirelc.policy" in text
    assert "function-local import of hirelc.models in hirelc.train" in text
    assert "function-local import of numpy without a comment" in text
    assert "hirelc.export.verify imports hirelc.train, which hirelc.export must not use" in text
    assert "hirelc.search imports hirelc.latency, which hirelc.search must not use" in text
    assert "hirelc.stray: in no layer" in text
    assert "hirelc.kernels.quant imports hirelc.validate: hirelc.kernels may import only" in text
    assert "hirelc.cost (core) imports hirelc.studies (studies), a layer above it" in text
    assert "hirelc.data" not in text and "hirelc.cli" not in text
    assert len(problems) == 9, problems


def test_a_clean_tree_passes(contract, tmp_path):
    root = _tree(tmp_path, {
        "t/__init__.py": "from hirelc import errors\n",
        "t/errors.py": "",
        "t/policy.py": "from hirelc.errors import *\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from hirelc import pipeline\n",  # annotations only: no edge
        "t/pipeline.py": "from hirelc import policy\nfrom . import errors\n",
        "k/__init__.py": "from hirelc.kernels import quant\n",
        "k/quant.py": "from hirelc.errors import HirelcError\n",
    })
    assert contract.check(root, {"t": "hirelc", "k": "hirelc.kernels"}) == []
