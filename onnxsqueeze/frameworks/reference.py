"""The framework model as the reference: how far an ONNX model's outputs are from it.

An exporter that lost a dynamic axis, picked another opset's semantics or changed numerics
is invisible when the squeezed model is only compared with the exported one. So the
framework's own outputs on the same inputs judge both the export (the conversion row) and
the squeezed model. Float outputs compare by scale-relative error and cosine; integer and
string outputs (a classifier's labels) by the share of answers that agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxsqueeze.run.compare import compare_runs

#: An export within this of each output's scale is the framework model: float reorderings
#: (fused kernels, another summation order) stay far below it, a changed op does not.
CONVERSION_RTOL = 1e-3
#: Labels of an export may differ where float32 meets float64 on a near tie (scikit-learn
#: computes in float64, its ONNX model in float32), not more often than this.
CONVERSION_LABELS = 0.99


def is_label(value: Any) -> bool:
    """An output of answers (integers, strings), compared by agreement, not by error."""
    return np.asarray(value).dtype.kind in "iubUSO"


def against_framework(
    reference: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Per output: labels' agreement, or floats' max relative error and mean cosine; and
    one summary line."""
    names = list(reference[0]) if reference else []
    per_output: dict[str, dict[str, Any]] = {}
    floats = [n for n in names if not is_label(reference[0][n])]
    if floats:
        comparison = compare_runs(
            [{n: r[n] for n in floats} for r in reference],
            [{n: o[n] for n in floats if n in o} for o in outputs],
        )
        for o in comparison.outputs:
            per_output[o.name] = {
                "max_rel": o.max_rel,
                "cosine": o.cosine,
                "mismatch": o.mismatch,
            }
            if o.top1_agreement is not None:
                per_output[o.name]["top1_agreement"] = o.top1_agreement
    for name in names:
        if name in per_output:
            continue
        per_output[name] = _labels(name, reference, outputs)
    return {"samples": len(reference), "outputs": per_output, "summary": _summary(per_output)}


def _labels(name: str, reference: Sequence[Mapping], outputs: Sequence[Mapping]) -> dict:
    agree = total = 0
    for ref, out in zip(reference, outputs, strict=True):
        a, b = np.asarray(ref[name]), np.asarray(out.get(name))
        if a.shape != b.shape:
            return {"mismatch": f"shape {list(a.shape)} became {list(b.shape)}"}
        agree += int(np.sum(a == b))
        total += a.size
    return {"label_agreement": agree / total if total else 1.0, "labels": total}


def _summary(per_output: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for name, m in per_output.items():
        if m.get("mismatch"):
            parts.append(f"{name}: {m['mismatch']}")
        elif "label_agreement" in m:
            parts.append(f"{name}: labels agree {m['label_agreement']:.2%} of {m['labels']}")
        else:
            text = f"{name}: max_rel {m['max_rel']:.2e}, cosine {m['cosine']:.6f}"
            if "top1_agreement" in m:
                text += f", top-1 {m['top1_agreement']:.2%}"
            parts.append(text)
    return "; ".join(parts)


def conversion_holds(comparison: Mapping[str, Any]) -> bool:
    """Whether an export computes what its framework model does (see CONVERSION_RTOL)."""
    for m in comparison["outputs"].values():
        if m.get("mismatch"):
            return False
        if "label_agreement" in m:
            if m["label_agreement"] < CONVERSION_LABELS:
                return False
        elif m["max_rel"] > CONVERSION_RTOL:
            return False
    return True


def budget_miss(comparison: Mapping[str, Any], budget: Any) -> str | None:
    """What of ``budget`` (its cosine and agreement limits) the outputs miss against the
    framework's, or None: the squeezed model is judged by the framework too."""
    agreement = budget.min_class_agreement or budget.min_top1_agreement
    for name, m in comparison["outputs"].items():
        if m.get("mismatch"):
            return f"{name}: {m['mismatch']}"
        if "label_agreement" in m and agreement and m["label_agreement"] < agreement:
            return f"{name}: labels agree {m['label_agreement']:.2%} (min {agreement:g})"
        if budget.min_cosine is not None and m.get("cosine", 1.0) < budget.min_cosine:
            return f"{name}: cosine {m['cosine']:.5f} (min {budget.min_cosine:g})"
    return None
