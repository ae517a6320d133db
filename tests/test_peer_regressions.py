"""Regression tests for failures peers shipped, run through the whole lossless preset.

- onnxsim#265: x/2 + y*4 came out as x/2 + y*2 (constants wrongly merged).
- onnxsim#1284: a pads tensor built by Concat→Reshape([-1,2])→Slice(step -1)→Transpose→
  Reshape (what torch emits for F.pad) was folded from flat shape data and changed outputs.
- Slice ending at -1 removed as if it were a full slice; subgraph Identity of an outer-scope
  value removed; folding that inflates the file (see test_fold_constants / test_shapes_ifs).
"""

from __future__ import annotations

import numpy as np

import onnxsqueeze

from conftest import parse, run_ort


def _check(text: str, feeds: dict) -> onnxsqueeze.Report:
    original = parse(text)
    squeezed, report = onnxsqueeze.squeeze(original, preset="lossless", data=[feeds])
    for a, b in zip(run_ort(original, feeds), run_ort(squeezed, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    return report


def test_distinct_constants_with_equal_bytes_are_not_merged():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, float[3] y, int32[3] i) => (float[3] out, int32[3] iout, float[2, 1] c, float[1, 2] d)
    <float two = {2.0}, float four = {4.0}, int32 one_i = {1065353216}, float one_f = {1.0},
     float[2, 1] col = {1, 2}, float[1, 2] row = {1, 2}>
    {
      x0 = Div(x, two)
      y0 = Mul(y, four)
      s = Add(x0, y0)
      out = Mul(s, one_f)
      iout = Add(i, one_i)
      c = Identity(col)
      d = Identity(row)
    }
    """
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal(3).astype(np.float32),
        "y": rng.standard_normal(3).astype(np.float32),
        "i": np.arange(3, dtype=np.int32),
    }
    report = _check(text, feeds)
    assert report.verification_status == "passed"


def test_pad_construction_chain_is_folded_correctly():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 3, 4, 5] x) => (float[?, ?, ?, ?] y)
    <int64[4] extra = {0, 0, 1, 2}, int64 zero = {0}, int64[2] rows = {-1, 2}, int64[1] flat = {-1},
     int64[1] st = {-1}, int64[1] en = {-9223372036854775807}, int64[1] ax = {0}, int64[1] step = {-1}>
    {
      s = Shape(x)
      zeros = Mul(s, zero)
      all = Concat <axis = 0> (zeros, extra)
      pairs = Reshape(all, rows)
      flipped = Slice(pairs, st, en, ax, step)
      t = Transpose <perm = [1, 0]> (flipped)
      pads = Reshape(t, flat)
      y = Pad(x, pads)
    }
    """
    x = np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5)
    report = _check(text, {"x": x})
    assert report.verification_status == "passed"
    assert report.after["nodes"] == 1  # every shape op folded; only Pad computes at run time
