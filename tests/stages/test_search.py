"""The shared budget search (stages.search) with a family that is not quantization: each
candidate MatMul's weight replaced by a rank-2 truncation (what factorization will do), so
the search's interface is shown to carry any lossy change, not only QDQ."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxsqueeze.stages.budget import Budget
from onnxsqueeze.stages.judge import Judge
from onnxsqueeze.stages.search import Kept, SensitivityOptions, fewest_kept, rank

RNG = np.random.default_rng(7)
WIDTH = 16


def _low_rank(rank: int) -> np.ndarray:
    return (RNG.standard_normal((WIDTH, rank)) @ RNG.standard_normal((rank, WIDTH))).astype(
        np.float32
    ) / np.float32(WIDTH)


def _chain() -> ir.Model:
    """y = ((x @ W1) @ W2) @ W3: W1 and W3 are rank 2 (truncating them to rank 2 costs
    nothing), W2 is full rank (truncating it loses most of the signal)."""
    proto = onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[4, {WIDTH}] x) => (float[4, {WIDTH}] y) {{
            a = MatMul (x, w1)  b = MatMul (a, w2)  y = MatMul (b, w3)
        }}"""
    )
    weights = [_low_rank(2), np.eye(WIDTH, dtype=np.float32) + 0.01, _low_rank(2)]
    for index, (node, weight) in enumerate(zip(proto.graph.node, weights, strict=True), 1):
        node.name = f"m{index}"
        proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, f"w{index}"))
    return ir.serde.deserialize_model(proto)


class TruncateFamily:
    """Candidates: every MatMul; a build replaces each weight but ``kept`` by its best rank-2
    approximation."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.builds = 0

    @property
    def candidates(self) -> dict[str, ir.Node]:
        return {n.name: n for n in self.model.graph if n.op_type == "MatMul"}

    def build(self, kept: Sequence[str]) -> ir.Model:
        self.builds += 1
        model = self.model.clone()
        for node in model.graph:
            if node.op_type != "MatMul" or node.name in kept:
                continue
            weight = node.inputs[1]
            u, s, vt = np.linalg.svd(weight.const_value.numpy())
            truncated = (u[:, :2] * s[:2]) @ vt[:2]
            weight.const_value = ir.tensor(truncated.astype(np.float32), name=weight.name)
        return model


@pytest.mark.parametrize("method", ["exact", "local", "local+exact"])
def test_the_shared_search_keeps_the_one_node_whose_change_breaks_the_budget(method):
    model = _chain()
    family = TruncateFamily(model)
    feeds = [{"x": RNG.standard_normal((4, WIDTH)).astype(np.float32)} for _ in range(4)]
    judge = Judge(model, feeds, Budget(min_cosine=0.999), ["cpu"])
    changed = family.build(())
    ok, summary = judge(changed)
    assert not ok, summary  # truncating W2 loses most of the signal
    ranking = rank(
        family, list(family.candidates), changed, judge, SensitivityOptions(method, max_exact=1)
    )
    assert ranking.method == method and ranking.order[0] == "m2", ranking
    kept = fewest_kept(ranking.order, family.build, judge)
    assert kept.count == 1 and kept.model is not None, kept
    assert judge(kept.model)[0]
    # m1 and m3 were truncated in the shipped model, m2 was not
    ranks = {
        n.name: np.linalg.matrix_rank(n.inputs[1].const_value.numpy(), tol=1e-4)
        for n in kept.model.graph
    }
    assert ranks == {"m1": 2, "m2": WIDTH, "m3": 2}


def _threshold_search(need: int, size: int, none_kept_fails: bool) -> tuple[Kept, list[int]]:
    """fewest_kept on stubs: a "model" is how many leading nodes were kept; the budget
    holds from ``need`` kept on. Returns the result and the counts judged, in order."""
    judged: list[int] = []

    def judge(kept_count: int) -> tuple[bool, str]:
        judged.append(kept_count)
        return kept_count >= need, f"{kept_count} kept"

    order = [f"n{i}" for i in range(size)]
    return fewest_kept(order, len, judge, none_kept_fails=none_kept_fails), judged


@pytest.mark.parametrize("none_kept_fails", [True, False])
@pytest.mark.parametrize("need", [1, 3, 7])
def test_fewest_kept_finds_the_smallest_count_that_meets_the_budget(need, none_kept_fails):
    found, judged = _threshold_search(need, 8, none_kept_fails)
    assert found.count == need and found.model == need and found.summary == f"{need} kept"
    assert found.tries == len(judged) <= 4  # a bisection of 8: log2(8) + 1 models at most
    if none_kept_fails:
        assert 0 not in judged and judged[0] == 7  # the fully changed model was judged before


@pytest.mark.parametrize("none_kept_fails", [True, False])
def test_fewest_kept_says_when_no_count_meets_the_budget(none_kept_fails):
    """At least the last node stays changed (or there is nothing to ship): a budget that
    only holds with every node kept is not met."""
    found, judged = _threshold_search(8, 8, none_kept_fails)
    assert found.model is None and found.count == 8 and 8 not in judged


def test_local_scores_are_the_same_when_the_float_run_waits_on_disk(tmp_path):
    """In a file run the float model's exposed activations go to the spill file one sample at
    a time and come back one at a time beside the changed model's (a 1.3 GB transformer's
    held 0.45 GiB beside the float session): the scores are the same, bit for bit."""
    from onnxsqueeze.core.spill import Spill, spilling
    from onnxsqueeze.stages.sensitivity import local_scores

    model = _chain()
    family = TruncateFamily(model)
    feeds = [{"x": RNG.standard_normal((4, WIDTH)).astype(np.float32)} for _ in range(3)]
    changed = family.build(())
    held = local_scores(model, changed, family.candidates, feeds, ["cpu"])
    spill = Spill(tmp_path, min_bytes=1 << 30)
    with spilling(spill):
        spilled = local_scores(model, changed, family.candidates, feeds, ["cpu"])
    spill.close()
    assert spill.spilled > 0 and spilled == held and held["m2"] > held["m1"], held
