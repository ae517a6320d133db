"""How a model travels to a Ray worker (no cluster needed: a stand-in object store):
weights in files go as where they lie, the others once through the store, and the worker
rebuilds the driver's model, tensor kinds included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxsqueeze.core.errors import SqueezeError
from onnxsqueeze.core.spill import Spill
from onnxsqueeze.distributed.shipping import FileSlice, Shipper, arrays, landed, shippable
from onnxsqueeze.run.session import Session, takes_parts

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "models" / "digits_cnn.onnx"


class Store:
    """Ray's put/get on a dict, counting what is put."""

    def __init__(self) -> None:
        self.objects: dict[int, np.ndarray] = {}

    def put(self, array: np.ndarray) -> int:
        self.objects[len(self.objects)] = array
        return len(self.objects) - 1

    def get(self, refs: list[int]) -> list[np.ndarray]:
        return [self.objects[r] for r in refs]


def _kinds(model: ir.Model) -> dict[str, str]:
    return {n: type(v.const_value).__name__ for n, v in model.graph.initializers.items()}


def test_external_weights_travel_as_file_slices_and_land_as_external(digits_external):
    model = ir.load(digits_external)
    store = Store()
    counts: dict[str, int] = {}
    shipped = Shipper(
        store, local=True, count=lambda k, n=1: counts.update({k: n + counts.get(k, 0)})
    )(model)
    assert not store.objects  # nothing through the store
    assert all(isinstance(w, FileSlice) and w.external for w in shipped.weights.values())
    assert counts["weights_read_in_place"] == len(model.graph.initializers)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert len(shipped.graph) < weight_bytes / 5  # the graph alone
    back = landed(shipped, store)
    assert _kinds(back) == _kinds(model)
    assert takes_parts(back) == takes_parts(model) == shipped.parts is False
    for name, value in model.graph.initializers.items():
        assert np.array_equal(
            back.graph.initializers[name].const_value.numpy(), value.const_value.numpy()
        )
    feed = {"image": np.load(REPO / "models" / "digits_test.npz")["image"][:1]}
    assert np.array_equal(
        Session(back).run(feed)[back.graph.outputs[0].name],
        Session(model).run(feed)[model.graph.outputs[0].name],
    )


@pytest.mark.parametrize("local", [True, False])
def test_spilled_weights_are_read_from_the_spill_file_only_on_this_machine(tmp_path, local):
    model = ir.load(DIGITS)
    for value in model.graph.initializers.values():  # as a pass leaves its new weights
        value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    spill = Spill(tmp_path, min_bytes=4096)  # what a graph sheds (weightless)
    spill(model)
    spilled = [
        n for n, v in model.graph.initializers.items() if isinstance(v.const_value, ir.LazyTensor)
    ]
    assert spilled
    store = Store()
    shipped = Shipper(store, local=local)(model)
    for name in spilled:
        where = shipped.weights[name]
        if local:
            assert isinstance(where, FileSlice) and not where.external
            assert Path(where.path) == spill.path.resolve()
        else:  # another machine cannot see this process's spill file
            assert not isinstance(where, FileSlice)
    back = landed(shipped, store)
    assert not any(
        isinstance(v.const_value, ir.ExternalTensor) for v in back.graph.initializers.values()
    )
    assert shipped.parts and takes_parts(model)
    got = arrays(shipped, store)
    for name in spilled:
        assert np.array_equal(got[name], model.graph.initializers[name].const_value.numpy())
    spill.close()


def test_a_tensor_is_put_once_for_all_the_models_sharing_it(tmp_path):
    model = ir.load(DIGITS)
    store = Store()
    ship = Shipper(store, local=True)
    first = ship(model)
    second = ship(model)
    assert first.weights == second.weights
    assert len(store.objects) == len(first.weights)


@pytest.mark.parametrize("truncate", [False, True])
def test_a_worker_that_cannot_find_the_weights_says_where_they_must_be(tmp_path, truncate):
    data = tmp_path / "w.data"
    data.write_bytes(b"\0" * 64)
    if not truncate:
        data.unlink()
    where = FileSlice(str(data), 0, 128, ir.DataType.FLOAT, (32,), True)
    with pytest.raises(SqueezeError, match="every node mounts") as err:
        where.tensor("w")
    assert str(data) in str(err.value)


def test_weights_in_a_subgraphs_external_file_keep_the_model_here(digits_external):
    model = ir.load(digits_external)
    assert shippable(model)
    inner = ir.Graph([], [], nodes=[], name="inner")
    weight = next(iter(model.graph.initializers.values()))
    moved = ir.Value(name="sub_w", const_value=weight.const_value)
    inner.register_initializer(moved)
    node = ir.Node(
        "", "If", [model.graph.inputs[0]], attributes=[ir.AttrGraph("then_branch", inner)]
    )
    model.graph.append(node)
    assert not shippable(model)
