"""``onnxsqueeze.squeeze`` given what a converter's caller might pass by mistake: each is a
SqueezeError (or a TypeError) whose message names the API's argument, never an error from
deep inside (AttributeError, KeyError...), and the caller's model is left as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from harness import small_model

import onnxsqueeze
from onnxsqueeze.core.errors import SqueezeError

NAN = float("nan")
X = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)

BAD_MODELS = [None, 123, 3.5, [1, 2], {"a": 1}, object(), b"", b"garbage", bytearray(b"junk"),
              "missing.onnx", Path("missing.onnx"), ""]  # fmt: skip

BAD_ARGUMENTS = [
    ("passes", [123]), ("passes", ["ghost"]), ("passes", [("cleanup", 5)]), ("passes", 5),
    ("passes", ""), ("passes", ","), ("preset", "ghost"), ("preset", None),
    ("quantize", 123), ("quantize", "bogus"), ("quantize", object()), ("quantize", ""),
    ("factorize", "nan"), ("factorize", -1), ("factorize", 2), ("factorize", "bogus"),
    ("factorize", NAN), ("prune", 5), ("prune", "bogus"), ("prune", "channels=nan"),
    ("shapes", {"ghost": [1]}), ("shapes", {"x": [-1, 16]}), ("shapes", {"x": "abc"}),
    ("shapes", 123), ("shapes", "x:1x15"), ("data", 123), ("data", "missing.npz"),
    ("data", [{"ghost": X}]), ("data", [{"x": np.full_like(X, np.nan)}]), ("data", []),
    ("data", [123]), ("providers", ["bogus"]), ("providers", 123), ("providers", []),
    ("probe_samples", 0), ("probe_samples", -1), ("probe_samples", "a"),
    ("probe_samples", 10**12), ("seed", "a"), ("seed", 1.5), ("verify", "no"),
    ("base_dir", 123), ("strict", "yes"),
]  # fmt: skip

GOOD_ARGUMENTS = [
    ("passes", "cleanup"), ("passes", ("cleanup", "fold-constants")), ("providers", "cpu"),
    ("shapes", "x:2x16"), ("shapes", {"x": (2, 16)}), ("shapes", ["N=3"]),
    ("data", [{"x": X}]), ("data", {"x": X}), ("quantize", "none"),
]  # fmt: skip


def _serialized(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


@pytest.mark.parametrize("source", BAD_MODELS, ids=[repr(m)[:30] for m in BAD_MODELS])
def test_a_bad_model_argument_is_a_clear_error(workspace, source):
    with pytest.raises((SqueezeError, TypeError)) as info:
        onnxsqueeze.squeeze(source)
    assert str(info.value).strip() and "\n" not in str(info.value).strip()
    assert "--" not in str(info.value)


@pytest.mark.parametrize(
    "name, value", BAD_ARGUMENTS, ids=[f"{n}={v!r}"[:40] for n, v in BAD_ARGUMENTS]
)
def test_a_bad_argument_is_a_clear_error_naming_it(workspace, name, value):
    model = small_model()
    before = _serialized(model)
    with pytest.raises((SqueezeError, TypeError)) as info:
        onnxsqueeze.squeeze(model, **{name: value})
    text = str(info.value)
    assert "--" not in text, text  # API words, not the command line's
    assert type(info.value).__name__ not in ("AttributeError", "KeyError", "IndexError")
    assert _serialized(model) == before


@pytest.mark.parametrize(
    "name, value", GOOD_ARGUMENTS, ids=[f"{n}={v!r}"[:40] for n, v in GOOD_ARGUMENTS]
)
def test_forms_a_caller_would_expect_are_accepted(workspace, name, value):
    model = small_model()
    before = _serialized(model)
    options = {"quantize": "none", name: value}
    out, report = onnxsqueeze.squeeze(model, **options)
    onnx.checker.check_model(out)
    assert report.verification_status == "passed"
    assert _serialized(model) == before
    if name == "passes":
        names = [p.name for p in report.passes]
        assert names == ([value] if isinstance(value, str) else list(value))
