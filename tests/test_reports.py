"""The reports people and pipelines read: every JSON report validates against its documented,
versioned schema, and the HTML pages render in headless Chromium with their plots drawn."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxsqueeze.cli import main
from onnxsqueeze.pipeline.schema import SCHEMAS
from tests.conftest import REPO, weighted_model

DIGITS = REPO / "models" / "digits_cnn.onnx"
DIGITS_DATA = REPO / "models" / "digits_test.npz"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """One run of each command on the shipped digits CNN, JSON and HTML written."""
    pytest.importorskip("matplotlib", reason="the html extra (matplotlib) is not installed")
    tmp = tmp_path_factory.mktemp("reports")
    out = {
        name: tmp / f"{name}.json" for name in ("squeeze", "bench", "compare", "inspect", "plan")
    }
    pages = {name: tmp / f"{name}.html" for name in ("squeeze", "bench", "compare")}
    small = tmp / "small.onnx"
    base = ["--data", str(DIGITS_DATA)]
    assert (
        main(
            [str(DIGITS), "-o", str(small), *base, "--report", str(out["squeeze"])]
            + ["--report-html", str(pages["squeeze"]), "--plan", str(out["plan"]), "-q"]
        )
        == 0
    )
    assert (
        main(
            ["bench", str(DIGITS), str(small), *base, "--rounds", "2", "--batch", "1,4"]
            + ["--json", str(out["bench"]), "--report-html", str(pages["bench"]), "-q"]
        )
        == 0
    )
    assert (
        main(
            ["compare", str(DIGITS), str(small), *base, "--per-tensor"]
            + ["--json", str(out["compare"]), "--report-html", str(pages["compare"]), "-q"]
        )
        == 0
    )
    assert main(["inspect", str(small), "--json", str(out["inspect"]), "-q"]) == 0
    return {
        **{f"{k}.json": v for k, v in out.items()},
        **{f"{k}.html": v for k, v in pages.items()},
    }


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_every_json_report_validates_against_its_schema(reports, kind):
    jsonschema = pytest.importorskip("jsonschema")
    report = json.loads(reports[f"{kind}.json"].read_text())
    assert report["schema"] == f"onnxsqueeze.{kind}" and report["schema_version"] == 1
    jsonschema.validate(report, SCHEMAS[kind])
    broken = dict(report)
    broken.pop(SCHEMAS[kind]["required"][-1])
    with pytest.raises(jsonschema.ValidationError):  # the schema does check something
        jsonschema.validate(broken, SCHEMAS[kind])


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian's chromium) not found")
@pytest.mark.parametrize(("kind", "plots"), [("squeeze", 2), ("bench", 1), ("compare", 1)])
def test_html_report_renders_with_its_plots_and_no_errors(reports, kind, plots):
    page = reports[f"{kind}.html"]
    text = page.read_text()
    # self-contained: nothing fetched (XML namespace names are not fetched)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|url\(\s*["']?https?:|<link""", text)
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stderr[-2000:]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    assert attrs.get("errors") == "[]", attrs
    assert int(attrs["plots"]) >= plots and attrs["drawn"] == attrs["plots"], attrs
    assert "Uncaught" not in done.stderr


def test_report_html_without_matplotlib_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    weight = np.ones((8, 4), np.float32)
    model = tmp_path / "m.onnx"
    onnx.save(weighted_model("MatMul", weight, ["n", 8]), model)
    out = tmp_path / "out.onnx"
    code = main([str(model), "-o", str(out), "--report-html", str(tmp_path / "r.html")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'onnxsqueeze[html]'" in err[0]
    assert not out.exists() and not (tmp_path / "r.html").exists()
