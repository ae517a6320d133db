"""Every quantize mode on models the corpus does not have: exports, converters, other tools'
outputs. Each run is the CLI in its own process, with seeded inputs saved as npz (``--data``)
and, for auto/static, also without them. A run passes when the CLI exits 0 with a verified
model, or fails with a one-line error (static without data is expected to).

Families (skipped when their package is missing): PyTorch legacy exports (torch), Hugging
Face models with random weights (hf: BERT, GPT-2, ViT, Whisper's encoder; hfx: ten more
architectures), torch.export-based exports (dynamo), scikit-learn pipelines (skl2onnx), and
models other tools produced (onnxruntime.quantization QDQ/dynamic, onnxruntime's transformer
optimizer, a float16 model with float16 I/O, an onnxruntime QDQ transformer block), and the
families of issue 25 (issue25: an unrolled RNN sharing its weights, a conv + LSTM recogniser,
a Keras CNN through tf2onnx). Every output is checked for a weight stored twice and squeezed
again by the same command (a squeezed model squeezed again must not change).

    python tools/robustness_sweep.py [--families torch,hf,hfx,dynamo,skl,issue25,derived] [--modes auto,static]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODES = ("auto", "none", "static", "dynamic", "fp16", "weights-int8", "weights-int4")
RNG = np.random.default_rng(0)


def _samples(folder: Path, make, n: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.savez(folder / f"{i:03d}.npz", **make(i))


def _export(module, args, path: Path, names, dynamic, opset: int = 17) -> None:
    import torch

    module.eval()
    torch.onnx.export(
        module, args, str(path), dynamo=False, input_names=names, dynamic_axes=dynamic,
        opset_version=opset,
    )  # fmt: skip


def torch_models(out: Path) -> dict[str, Path]:
    """Conv nets with BatchNorm/SE/hardswish/ConvTranspose, GroupNorm + Upsample, a YOLO-like
    head, LSTM/GRU, attention with a padding mask, a scripted loop, Conv3d, Einsum."""
    import torch

    nn = torch.nn
    torch.manual_seed(0)

    class Conv(nn.Module):
        def __init__(s):
            super().__init__()
            s.a = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish())
            s.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16))
            s.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1), nn.Hardsigmoid())
            s.norm = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.GroupNorm(4, 32), nn.SiLU())
            s.up = nn.ConvTranspose2d(32, 16, 2, 2)
            s.head = nn.Linear(32, 10)

        def forward(s, x):
            y = s.dw(s.a(x))
            y = y * s.se(y)
            z = s.norm(y)
            y = torch.cat([y, s.up(z)], 1)
            return torch.softmax(s.head(y.mean((2, 3))), -1)

    class Recurrent(nn.Module):
        def __init__(s):
            super().__init__()
            s.lstm, s.gru = nn.LSTM(32, 64, batch_first=True), nn.GRU(64, 32, batch_first=True)
            s.fc = nn.Linear(32, 5)

        def forward(s, x):
            return s.fc(s.gru(s.lstm(x)[0])[0][:, -1])

    class Encoder(nn.Module):
        def __init__(s):
            super().__init__()
            s.emb = nn.Embedding(1000, 128)
            layer = nn.TransformerEncoderLayer(128, 4, 256, batch_first=True)
            s.enc, s.head = nn.TransformerEncoder(layer, 2), nn.Linear(128, 2)

        def forward(s, ids, mask):
            return s.head(s.enc(s.emb(ids), src_key_padding_mask=mask == 0).mean(1))

    class Loop(nn.Module):
        def __init__(s):
            super().__init__()
            s.l, s.o = nn.Linear(64, 64), nn.Linear(64, 4)

        def forward(s, x):
            outs, h = [], torch.zeros(x.shape[0], 64)
            for t in range(x.shape[1]):
                h = torch.tanh(s.l(x[:, t]) + h)
                outs.append(h)
            return s.o(torch.stack(outs, 1))

    class Volume(nn.Module):
        def __init__(s):
            super().__init__()
            s.c, s.bn, s.fc = nn.Conv3d(2, 32, 3, padding=1), nn.BatchNorm3d(32), nn.Linear(32, 3)

        def forward(s, x):
            return s.fc(torch.relu(s.bn(s.c(x))).mean((2, 3, 4)))

    class Heads(nn.Module):
        def __init__(s):
            super().__init__()
            s.w = nn.Parameter(torch.randn(8, 64, 64) / 8)

        def forward(s, x):
            return torch.einsum("bhd,hde->bhe", x, s.w)

    models = {  # name: (module, dynamic axes of x, samples)
        "conv": (Conv(), (0, 2, 3), lambda i: RNG.random((1, 3, 64, 64 + 32 * (i % 2)))),
        "lstm_gru": (Recurrent(), (0, 1), lambda i: RNG.standard_normal((1, 10 + i, 32))),
        "volume": (Volume(), (0,), lambda i: RNG.standard_normal((1, 2, 8, 16, 16))),
        "einsum": (Heads(), (0,), lambda i: RNG.standard_normal((4, 8, 64))),
    }
    paths = {}
    for name, (module, axes, make) in models.items():
        paths[name] = out / f"{name}.onnx"
        sample = torch.tensor(make(0), dtype=torch.float32)
        _export(module, (sample,), paths[name], ["x"], {"x": {a: f"d{a}" for a in axes}})
        _samples(out / name, lambda i, m=make: {"x": m(i).astype(np.float32)})
    ids, mask = torch.randint(0, 1000, (1, 16)), torch.ones(1, 16, dtype=torch.long)
    paths["encoder"] = out / "encoder.onnx"
    dims = {"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}}
    _export(Encoder(), (ids, mask), paths["encoder"], ["ids", "mask"], dims)
    # the legacy export of nn.TransformerEncoder's fast path bakes in the traced length
    _samples(out / "encoder", _token_sample(1000, "ids", "mask", length=16))
    paths["seq_loop"] = out / "seq_loop.onnx"
    scripted = torch.jit.script(Loop())
    _export(scripted, (torch.randn(2, 5, 64),), paths["seq_loop"], ["x"], {"x": {0: "b", 1: "t"}})
    _samples(out / "seq_loop", lambda i: {"x": RNG.standard_normal((2, 3 + i, 64)).astype("f4")})
    return paths


def _token_sample(vocab: int, ids: str, mask: str, length: int | None = None):
    """Token ids and a padding mask, of growing lengths unless ``length`` is fixed."""

    def make(i: int) -> dict:
        length_i = length or 6 + 2 * i
        padding = np.ones((1, length_i), np.int64)
        padding[0, length_i - i // 2 :] = 0
        return {ids: RNG.integers(0, vocab, (1, length_i)), mask: padding}

    return make


def hf_models(out: Path) -> dict[str, Path]:
    """BERT, GPT-2, ViT and Whisper's encoder with random weights (legacy exports)."""
    import torch
    import transformers as T

    torch.manual_seed(0)

    k = _Keywords
    small = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4}
    bert = T.BertForSequenceClassification(T.BertConfig(vocab_size=1000, **small))
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=1000))
    vit = T.ViTForImageClassification(T.ViTConfig(image_size=64, patch_size=8, **small))
    whisper = T.WhisperModel(
        T.WhisperConfig(
            encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4,
            decoder_attention_heads=4, num_mel_bins=16, max_source_positions=50,
            vocab_size=500, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    ).encoder  # fmt: skip
    tokens = {"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}}
    ids, mask = torch.randint(0, 1000, (1, 12)), torch.ones(1, 12, dtype=torch.long)
    specs = {
        "hf_bert": (k.text(bert), (ids, mask), ["ids", "mask"], tokens, _token_sample(1000, "ids", "mask")),
        "hf_gpt2": (k.text(gpt2, use_cache=False), (ids, mask), ["ids", "mask"], tokens, _token_sample(1000, "ids", "mask")),
        "hf_vit": (k.single(vit, "pixel_values"), (torch.randn(1, 3, 64, 64),), ["pixels"], {"pixels": {0: "b"}}, _pixels()),
        "hf_whisper_encoder": (k.single(whisper, "input_features"), (torch.randn(1, 16, 100),), ["mel"], {"mel": {0: "b"}}, lambda i: {"mel": RNG.standard_normal((1, 16, 100)).astype("f4")}),
    }  # fmt: skip
    paths = {}
    for name, (module, args, names, dims, make) in specs.items():
        paths[name] = out / f"{name}.onnx"
        # opset 14: onnxruntime's optimizer then writes LayerNormalization below its opset
        _export(module, args, paths[name], names, dims, opset=14)
        _samples(out / name, make)
    return paths


class _Keywords:
    """Wrappers that feed a Hugging Face model named positional inputs (plus fixed keyword
    arguments) and return its first output; a fixed signature also suits torch.export."""

    @staticmethod
    def text(model, **fixed):
        import torch

        class Text(torch.nn.Module):
            def __init__(s):
                super().__init__()
                s.model = model

            def forward(s, ids, mask):
                return s.model(input_ids=ids, attention_mask=mask, **fixed)[0]

        return Text()

    @staticmethod
    def single(model, key: str):
        import torch

        class Single(torch.nn.Module):
            def __init__(s):
                super().__init__()
                s.model = model

            def forward(s, x):
                return s.model(**{key: x})[0]

        return Single()


def _pixels(size: int = 64):
    return lambda i: {"pixels": RNG.random((1 + i % 2, 3, size, size)).astype("f4")}


def hfx_models(out: Path) -> dict[str, Path]:
    """More Hugging Face architectures, random weights, legacy exports: convolutional
    (ConvNeXt, ResNet, MobileNetV2), hybrid and windowed vision transformers (SegFormer,
    Swin, MobileViT), text encoders (DistilBERT, RoBERTa, T5) and speech (wav2vec 2.0)."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    k = _Keywords
    image = (torch.randn(1, 3, 64, 64),)
    text = (torch.randint(0, 1000, (1, 12)), torch.ones(1, 12, dtype=torch.long))
    tokens = {"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}}

    def vision(model):
        return k.single(model, "pixel_values"), image, ["pixels"], {"pixels": {0: "b"}}, _pixels()

    def words(model):
        sample = _token_sample(1000, "ids", "mask")
        return k.text(model), text, ["ids", "mask"], tokens, sample

    specs = {
        "convnext": vision(T.ConvNextForImageClassification(T.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], image_size=64))),
        "hf_resnet": vision(T.ResNetForImageClassification(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]))),
        "mobilenet_v2": vision(T.MobileNetV2ForImageClassification(T.MobileNetV2Config(image_size=64, depth_multiplier=0.35))),
        "segformer": vision(T.SegformerForSemanticSegmentation(T.SegformerConfig(hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1], decoder_hidden_size=32))),
        "swin": vision(T.SwinForImageClassification(T.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4))),
        "mobilevit": vision(T.MobileViTForImageClassification(T.MobileViTConfig(image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 80]))),
        "distilbert": words(T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=1000, n_layers=2, dim=64, hidden_dim=128, n_heads=4))),
        "roberta": words(T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=1000, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128))),
        "t5_encoder": words(T.T5EncoderModel(T.T5Config(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))),
        "wav2vec2": (
            k.single(T.Wav2Vec2Model(T.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2)), "input_values"),
            (torch.randn(1, 1600),), ["audio"], {"audio": {0: "b", 1: "t"}},
            lambda i: {"audio": RNG.standard_normal((1, 1600 + 160 * i)).astype("f4")},
        ),
    }  # fmt: skip
    paths = {}
    for name, (module, args, names, dims, make) in specs.items():
        paths[name] = out / f"{name}.onnx"
        _export(module, args, paths[name], names, dims)
        _samples(out / name, make)
    return paths


def dynamo_models(out: Path) -> dict[str, Path]:
    """torch.onnx.export(dynamo=True) (torch.export, onnxscript; opset 18) of BERT, a ResNet
    and ViT with dynamic batch (and sequence) sizes: what current PyTorch exports by default."""
    import onnxscript  # noqa: F401  (the exporter needs it; skip the family without)
    import torch
    import transformers as T

    torch.manual_seed(0)
    k = _Keywords
    batch, seq = torch.export.Dim("b", max=64), torch.export.Dim("s", max=512)
    small = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 4}
    image = (torch.randn(2, 3, 64, 64),)
    specs = {
        "dynamo_bert": (
            k.text(T.BertForSequenceClassification(T.BertConfig(vocab_size=1000, intermediate_size=512, **small))),
            (torch.randint(0, 1000, (2, 12)), torch.ones(2, 12, dtype=torch.long)),
            {"ids": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}},
            _token_sample(1000, "ids", "mask"),
        ),
        "dynamo_resnet": (
            k.single(T.ResNetForImageClassification(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])), "pixel_values"),
            image, {"x": {0: batch}}, lambda i: {"x": RNG.random((1 + i % 2, 3, 64, 64)).astype("f4")},
        ),
        "dynamo_vit": (
            k.single(T.ViTForImageClassification(T.ViTConfig(image_size=64, patch_size=8, intermediate_size=512, **small)), "pixel_values"),
            image, {"x": {0: batch}}, lambda i: {"x": RNG.random((1 + i % 2, 3, 64, 64)).astype("f4")},
        ),
    }  # fmt: skip
    paths = {}
    for name, (module, args, dims, make) in specs.items():
        paths[name] = out / f"{name}.onnx"
        module.eval()
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=list(dims), dynamic_shapes=dims,
            opset_version=18, verbose=False,
        )  # fmt: skip
        program.save(str(paths[name]))
        _samples(out / name, make)
    return paths


def skl_models(out: Path) -> dict[str, Path]:
    """Classifiers (ZipMap outputs), a regressor and pipelines with ai.onnx.ml ops."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    models = {
        "skl_forest": RandomForestClassifier(n_estimators=20, max_depth=6, random_state=0),
        "skl_logreg_pipe": make_pipeline(StandardScaler(), PCA(20), LogisticRegression()),
        "skl_mlp_pipe": make_pipeline(StandardScaler(), MLPClassifier((128, 64), random_state=0)),
    }
    paths = {}
    for name, model in models.items():
        model.fit(x, y)
        paths[name] = out / f"{name}.onnx"
        paths[name].write_bytes(to_onnx(model, x[:1], target_opset=17).SerializeToString())
        _samples(out / name, lambda i: {"X": x[8 * i : 8 * i + 8]})
    return paths


def issue25_models(out: Path) -> dict[str, Path]:
    """Families a user brought (issue 25): an RNN unrolled into one Gemm per step sharing its
    weights, a conv + LSTM text recogniser, a Keras CNN through tf2onnx (when TensorFlow is
    installed), and an already QDQ-quantized transformer block (onnxruntime's quantizer)."""
    import onnx
    import onnx.helper as oh
    import onnx.numpy_helper as nh
    import torch

    nn = torch.nn
    torch.manual_seed(0)
    paths: dict[str, Path] = {}
    width, steps = 128, 16
    weight = (RNG.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, previous = [], "x"
    for step in range(steps):
        nodes += [oh.make_node("Gemm", [previous, "W", "b"], [f"g{step}"], transB=1),
                  oh.make_node("Tanh", [f"g{step}"], [f"h{step}"])]  # fmt: skip
        previous = f"h{step}"
    graph = oh.make_graph(
        nodes, "unrolled", [oh.make_tensor_value_info("x", 1, ["n", width])],
        [oh.make_tensor_value_info(previous, 1, ["n", width])],
        [nh.from_array(weight, "W"), nh.from_array(np.zeros(width, np.float32) + 0.1, "b")],
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    paths["unrolled_rnn"] = out / "unrolled_rnn.onnx"
    onnx.save(model, paths["unrolled_rnn"])
    _samples(
        out / "unrolled_rnn", lambda i: {"x": RNG.standard_normal((4, width)).astype(np.float32)}
    )

    class Crnn(nn.Module):
        def __init__(s):
            super().__init__()
            s.cnn = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.MaxPool2d((2, 1)), nn.Conv2d(32, 64, 3, padding=1),
                                  nn.ReLU(), nn.MaxPool2d((4, 1)))  # fmt: skip
            s.rnn = nn.LSTM(128, 128, bidirectional=True, batch_first=True)
            s.fc = nn.Linear(256, 30)

        def forward(s, x):
            f = s.cnn(x)
            n, c, h, w = f.shape
            return s.fc(s.rnn(f.permute(0, 3, 1, 2).reshape(n, w, c * h))[0]).softmax(-1)

    paths["crnn"] = out / "crnn.onnx"
    line = lambda i: {"x": RNG.standard_normal((1, 1, 16, 48)).astype(np.float32)}  # noqa: E731
    _export(Crnn().eval(), (torch.from_numpy(line(0)["x"]),), paths["crnn"], ["x"], {"x": {3: "w"}})
    _samples(out / "crnn", line)
    try:
        import keras
        import tensorflow as tf
        import tf2onnx
    except ImportError:
        pass
    else:
        cnn = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(32, 3, activation="relu"),
                                keras.layers.MaxPooling2D(), keras.layers.Conv2D(64, 3, activation="relu"),
                                keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")])  # fmt: skip
        spec = [tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image")]
        proto, _ = tf2onnx.convert.from_function(tf.function(cnn), input_signature=spec, opset=17)
        paths["tf2onnx_cnn"] = out / "tf2onnx_cnn.onnx"
        onnx.save(proto, paths["tf2onnx_cnn"])
        name = proto.graph.input[0].name
        _samples(
            out / "tf2onnx_cnn", lambda i: {name: RNG.random((2, 32, 32, 3)).astype(np.float32)}
        )
    return paths


def derived_models(out: Path, sources: dict[str, Path]) -> dict[str, Path]:
    """What users feed after another tool: QDQ and dynamic int8 from onnxruntime.quantization,
    onnxruntime's transformer optimizer output, an fp16 model with fp16 inputs."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    import onnxsqueeze

    class Reader(CalibrationDataReader):
        """The samples of a model's folder, one at a time."""

        def __init__(self, files):
            self.it = (dict(np.load(f)) for f in files)

        def get_next(self):
            return next(self.it, None)

    def qdq(name: str) -> None:
        """onnxruntime's static QDQ quantization of ``name``, on that model's samples."""
        paths[f"ort_qdq_{name}"] = out / f"ort_qdq_{name}.onnx"
        reader = Reader(sorted((out / name).glob("*.npz")))
        quantize_static(str(sources[name]), str(paths[f"ort_qdq_{name}"]), reader,
                        quant_format=QuantFormat.QDQ)  # fmt: skip
        (out / f"ort_qdq_{name}").symlink_to(out / name)

    paths = {}
    if "conv" in sources:
        files = sorted((out / "conv").glob("*.npz"))
        qdq("conv")
        squeezed = onnxsqueeze.squeeze(
            onnx.load(sources["conv"]), passes=[("convert-fp16", {"keep_io": False})], verify=False
        )
        paths["fp16_io_conv"] = out / "fp16_io_conv.onnx"
        onnx.save(squeezed.model, paths["fp16_io_conv"])
        half = lambda i: {k: v.astype(np.float16) for k, v in np.load(files[i]).items()}  # noqa: E731
        _samples(out / "fp16_io_conv", half)
    if "encoder" in sources:  # an already QDQ-quantized transformer block
        qdq("encoder")
    if "hf_bert" in sources:
        from onnxruntime.transformers.optimizer import optimize_model

        paths["ort_dynamic_bert"] = out / "ort_dynamic_bert.onnx"
        quantize_dynamic(str(sources["hf_bert"]), str(paths["ort_dynamic_bert"]))
        paths["ort_optimized_bert"] = out / "ort_optimized_bert.onnx"
        optimized = optimize_model(str(sources["hf_bert"]), "bert", num_heads=4, hidden_size=128)
        optimized.save_model_to_file(str(paths["ort_optimized_bert"]))
        for name in ("ort_dynamic_bert", "ort_optimized_bert"):
            (out / name).symlink_to(out / "hf_bert")
    return paths


def run(model: Path, mode: str, data: Path | None, out: Path) -> dict:
    report = out / f"{model.stem}_{mode}_{'data' if data else 'probes'}.json"
    cmd = [sys.executable, "-m", "onnxsqueeze", str(model), "-o", str(report.with_suffix(".onnx"))]
    cmd += ["--quantize", mode, "--report", str(report), "-q"]
    cmd += ["--data", str(data)] if data else []
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    row = {"rc": done.returncode, "seconds": time.perf_counter() - started, "error": ""}
    lines = done.stderr.strip().splitlines()
    if done.returncode:
        row["error"] = lines[-1] if lines else "?"
        row["one_line"] = len(lines) == 1
        return row
    r = json.loads(report.read_text())
    q = r.get("quantization") or {}
    row.update(
        status=r["verification_status"],
        applied=q.get("mode") if q.get("applied") else "float",
        size=r["file_bytes_after"] / r["file_bytes_before"],
        warnings=len(r["warnings"]),
        duplicates=_duplicates(report.with_suffix(".onnx")),
    )
    # the output squeezed by the same command (not the input again: that would test a rerun)
    again = report.with_name(report.stem + "_again.onnx")
    cmd[cmd.index(str(model))] = str(report.with_suffix(".onnx"))
    cmd[cmd.index("-o") + 1], cmd[cmd.index("--report") + 1] = str(again), str(report) + ".again"
    twice = subprocess.run(cmd, capture_output=True, text=True, check=False)
    row["twice"] = "same" if twice.returncode == 0 and _graph(again) == _graph(
        report.with_suffix(".onnx")) else f"changed (exit {twice.returncode})"  # fmt: skip
    return row


def _duplicates(path: Path) -> int:
    """Initializers of 1024+ elements whose bytes another one has (a weight stored twice)."""
    import hashlib

    import onnx

    seen: dict[bytes, int] = {}
    for tensor in onnx.load(str(path)).graph.initializer:
        if int(np.prod(tensor.dims)) >= 1024:
            key = hashlib.blake2b(onnx.numpy_helper.to_array(tensor).tobytes()).digest()
            seen[key] = seen.get(key, 0) + 1
    return sum(n - 1 for n in seen.values())


def _graph(path: Path) -> tuple:
    import onnx

    if not path.is_file():
        return ()
    model = onnx.load(str(path))
    nodes = [(n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]
    weights = sorted(
        (i.name, onnx.numpy_helper.to_array(i).tobytes()) for i in model.graph.initializer
    )
    return nodes, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="torch,hf,hfx,dynamo,skl,issue25,derived")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "robustness.md")
    args = parser.parse_args()
    families = args.families.split(",")
    builders = {
        "torch": torch_models,
        "hf": hf_models,
        "hfx": hfx_models,
        "dynamo": dynamo_models,
        "skl": skl_models,
        "issue25": issue25_models,
    }
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models: dict[str, Path] = {}
        for family, build in builders.items():
            if family in families:
                try:
                    models.update(build(folder))
                except ImportError as exc:
                    skipped.append(f"{family}: {exc}")
        if "derived" in families:
            models.update(derived_models(folder, models))
        for name, path in models.items():
            for mode in args.modes.split(","):
                for data in (
                    [folder / name, None] if mode in ("auto", "static") else [folder / name]
                ):
                    row = {"model": name, "mode": mode, "data": data is not None}
                    row.update(run(path, mode, data, folder))
                    rows.append(row)
                    print(row, flush=True)
    args.out.write_text(render(rows, skipped, args))
    print(args.out.read_text())


def render(rows: list[dict], skipped: list[str], args) -> str:
    expected = lambda r: r["mode"] == "static" and not r["data"]  # noqa: E731
    good = sum(
        1
        for r in rows
        if (r["rc"] == 0 and r["status"] == "passed") or (expected(r) and r.get("one_line"))
    )
    lines = [
        "# Robustness: every quantize mode on models outside the corpus",
        "",
        f"`python tools/robustness_sweep.py --families {args.families} --modes {args.modes}`. "
        "Each row is one CLI run in its own process; data = seeded npz samples given as `--data` "
        "(else generated probes). size = output file / input file; shipped = the quantization "
        "applied (float: none met the budget, or none applied). A run passes when it exits 0 with "
        "verification passed; static without data must fail with a one-line error.",
        "",
        f"**{good} of {len(rows)} runs pass.** Families skipped: {', '.join(skipped) or 'none'}. "
        f"Outputs holding a weight twice: {sum(1 for r in rows if r.get('duplicates'))}; "
        f"outputs that a second squeeze of themselves changed: "
        f"{sum(1 for r in rows if r['rc'] == 0 and r.get('twice') != 'same')} "
        "(duplicated weights = initializers of 1024+ elements another one repeats; squeezed "
        "again = the output itself squeezed by the same command: same = the same nodes and the "
        "same weight bytes).",
        "",
        "| model | mode | data | exit | verification | shipped | size | duplicated weights | squeezed again | warnings | s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = "(expected: static needs data)" if expected(r) else ""
        lines.append(
            f"| {r['model']} | {r['mode']} | {'yes' if r['data'] else 'no'} | {r['rc']} | "
            f"{r.get('status', '-')} | {r.get('applied', '-')} | "
            f"{r['size']:.3f} | {r['duplicates']} | {r['twice']} | {r['warnings']} | "
            f"{r['seconds']:.1f} | |"
            if r["rc"] == 0
            else f"| {r['model']} | {r['mode']} | {'yes' if r['data'] else 'no'} | {r['rc']} | - "
            f"| - | - | - | - | - | {r['seconds']:.1f} | {r['error'][:120]} {note} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
