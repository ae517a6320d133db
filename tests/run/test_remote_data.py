"""Calibration data behind a URI (fsspec): listed and read like a local folder, file by file,
a part reading only its own files; missing data or an unknown protocol is one clear line."""

from __future__ import annotations

import numpy as np
import pytest

from onnxsqueeze.core.errors import CalibrationDataError
from onnxsqueeze.run.feeds import Subset, count_samples, load_feeds, part
from onnxsqueeze.run.remote import is_uri
from onnxsqueeze.run.signature import InputSpec

fsspec = pytest.importorskip("fsspec")
SPECS = [InputSpec("x", np.dtype("float32"), (1, 4))]


@pytest.fixture
def memory_folder():
    """Six samples in fsspec's in-memory filesystem: no local path can stand in for them."""
    fs = fsspec.filesystem("memory")
    root = "/calib"
    rng = np.random.default_rng(0)
    for i in range(6):
        with fs.open(f"{root}/{i:03d}.npz", "wb") as handle:
            np.savez(handle, x=rng.standard_normal((1, 4)).astype(np.float32))
    with fs.open(f"{root}/notes.txt", "wb") as handle:
        handle.write(b"not a sample")
    yield "memory://calib", fs
    fs.rm(root, recursive=True)


def test_a_uri_folder_reads_like_a_local_one(memory_folder, tmp_path):
    uri, fs = memory_folder
    assert count_samples(uri) == 6
    feeds = load_feeds(uri, SPECS)
    for i in range(len(feeds)):
        fs.get(f"/calib/{i:03d}.npz", str(tmp_path / f"{i:03d}.npz"))
    assert [f["x"].tolist() for f in feeds] == [
        f["x"].tolist() for f in load_feeds(tmp_path, SPECS)
    ]


def test_a_part_of_a_uri_folder_opens_only_its_files(memory_folder, monkeypatch):
    uri, _ = memory_folder
    shard = part(Subset(uri, frozenset(range(6))), 2, 4)
    assert shard == Subset(uri, frozenset({2, 3}))
    opened = []
    from onnxsqueeze.run import remote

    read = remote.read_npz
    monkeypatch.setattr(remote, "read_npz", lambda u: opened.append(u) or read(u))
    assert len(load_feeds(shard, SPECS)) == 2
    assert [u.rsplit("/", 1)[-1] for u in opened] == ["002.npz", "003.npz"]


def test_file_uris_and_single_files(tmp_path):
    np.savez(tmp_path / "one.npz", x=np.ones((1, 4), np.float32))
    uri = (tmp_path / "one.npz").as_uri()
    assert is_uri(uri) and not is_uri(str(tmp_path / "one.npz")) and not is_uri("C:/data")
    assert count_samples(uri) == 1
    assert load_feeds(uri, SPECS)[0]["x"].tolist() == [[1, 1, 1, 1]]
    assert len(load_feeds(tmp_path.as_uri(), SPECS)) == 1


@pytest.mark.parametrize(
    "uri, message",
    [
        ("memory://nowhere", "memory://nowhere: data file or folder not found"),
        ("nosuchprotocol://bucket/calib", "nosuchprotocol://bucket/calib: cannot open ("),
    ],
)
def test_missing_data_or_protocol_is_one_line(uri, message):
    with pytest.raises(CalibrationDataError) as caught:
        load_feeds(uri, SPECS)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
