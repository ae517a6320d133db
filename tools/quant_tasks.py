"""Task data and task accuracy for the quantization benchmark, one entry per corpus model.

Each task gives calibration samples, held-out evaluation samples (never used to calibrate),
one latency sample (batch 1), and a scorer that turns the float model's and a candidate's
outputs on the evaluation samples into task metrics (the first one is the headline):

- minilm: mean cosine of sentence embeddings vs fp32, nearest-neighbour agreement;
- ppocr_rec: exact text of rendered lines (CTC greedy decode, the model's own dictionary),
  against the ground truth and against fp32;
- ppocr_cls: orientation accuracy on rendered lines, half of them upside down;
- ppocr_det: F1 of the text mask (probability > 0.3) against fp32's mask;
- magika: label agreement with fp32 on real files;
- silero_vad(_ifless): max abs error of the speech probability over a streamed signal.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "models"))
import build_corpus  # noqa: E402

import corpus  # noqa: E402


@dataclasses.dataclass
class Task:
    name: str
    calib: list[dict]
    evaluation: list[dict]
    latency_feed: dict
    score: Callable[[list[dict], list[dict]], dict[str, float]]
    #: evaluation runs feed outputs of one step into the next (recurrent state)
    stateful: bool = False


def _sentences() -> list[str]:
    return (corpus.corpus_dir() / "minilm" / "sentences.txt").read_text().splitlines()


def minilm(n_calib: int) -> Task:
    import minilm_export

    model_dir = corpus.corpus_dir() / "minilm" / "package"
    sentences = _sentences()
    held_out = sentences[20:220]
    calib_text = sentences[220 : 220 + n_calib]
    tok = lambda s: minilm_export.tokenize(model_dir, [s])  # noqa: E731

    def score(ref, out):
        a = np.concatenate([r["sentence_embedding"] for r in ref])
        b = np.concatenate([o["sentence_embedding"] for o in out])
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        sa, sb = a @ a.T, b @ b.T
        np.fill_diagonal(sa, -np.inf)
        np.fill_diagonal(sb, -np.inf)
        return {
            "cosine": float(np.mean(np.sum(a * b, axis=1))),
            "NN agreement": float(np.mean(sa.argmax(1) == sb.argmax(1))),
        }

    return Task(
        "minilm", [tok(s) for s in calib_text], [tok(s) for s in held_out], tok(held_out[0]), score
    )


def _lines(count: int, offset: int) -> list[str]:
    return [" ".join(s.split()[:5]) for s in _sentences()[offset : offset + count]]


def ppocr_rec(n_calib: int) -> Task:
    import onnx

    meta = onnx.load(str(corpus.get("ppocr_rec").path), load_external_data=False).metadata_props
    chars = next(p.value for p in meta if p.key == "character").split("\n")
    table = ["", *chars, " "]
    texts = _lines(150, 20)
    feed = lambda t: {"x": build_corpus.ocr_rec_input(build_corpus.render_line(t))}  # noqa: E731

    def decode(probs: np.ndarray) -> str:
        ids = probs[0].argmax(-1)
        keep = [i for j, i in enumerate(ids) if i != 0 and (j == 0 or ids[j - 1] != i)]
        return "".join(table[i] if i < len(table) else "?" for i in keep)

    def score(ref, out):
        ref_text = [decode(next(iter(r.values()))) for r in ref]
        got = [decode(next(iter(o.values()))) for o in out]
        return {
            "text accuracy": float(np.mean([g == t for g, t in zip(got, texts, strict=True)])),
            "fp32 text accuracy": float(
                np.mean([r == t for r, t in zip(ref_text, texts, strict=True)])
            ),
            "agreement": float(np.mean([g == r for g, r in zip(got, ref_text, strict=True)])),
        }

    calib = [feed(t) for t in _lines(n_calib, 200)]
    return Task("ppocr_rec", calib, [feed(t) for t in texts], feed(texts[0]), score)


def ppocr_cls(n_calib: int) -> Task:
    texts = _lines(200, 20)

    def feed(i: int, text: str) -> dict:
        img = build_corpus.render_line(text)
        if i % 2:
            img = img[::-1, ::-1].copy()
        return {"x": build_corpus.ocr_cls_input(img)}

    truth = np.array([i % 2 for i in range(len(texts))])

    def score(ref, out):
        a = np.array([next(iter(r.values())).argmax() for r in ref])
        b = np.array([next(iter(o.values())).argmax() for o in out])
        return {
            "accuracy": float(np.mean(b == truth)),
            "fp32 accuracy": float(np.mean(a == truth)),
            "agreement": float(np.mean(a == b)),
        }

    calib = [feed(i, t) for i, t in enumerate(_lines(n_calib, 250))]
    evaluation = [feed(i, t) for i, t in enumerate(texts)]
    return Task("ppocr_cls", calib, evaluation, evaluation[0], score)


def ppocr_det(n_calib: int) -> Task:
    def page(offset: int) -> dict:
        return {"x": build_corpus.ocr_det_input(_lines(6, offset))}

    def score(ref, out):
        tp = fp = fn = 0
        for r, o in zip(ref, out, strict=True):
            a = next(iter(r.values())) > 0.3
            b = next(iter(o.values())) > 0.3
            tp += int(np.sum(a & b))
            fp += int(np.sum(~a & b))
            fn += int(np.sum(a & ~b))
        return {"mask F1 vs fp32": 2 * tp / max(2 * tp + fp + fn, 1)}

    evaluation = [page(20 + 6 * i) for i in range(16)]
    # pages of 6 lines from line 200 on, wrapping round to line 200 when the lines run out
    span = len(_sentences()) - 200 - 6
    calib = [page(200 + (6 * i) % span) for i in range(n_calib)]
    return Task("ppocr_det", calib, evaluation, evaluation[0], score)


def magika(n_calib: int) -> Task:
    x = np.load(corpus.corpus_dir() / "magika" / "eval.npz")["bytes"]
    calib = [{"bytes": x[i : i + 1]} for i in range(min(n_calib, 128))]
    evaluation = [{"bytes": x[i : i + 1]} for i in range(128, len(x))]

    def score(ref, out):
        a = [next(iter(r.values())).argmax() for r in ref]
        b = [next(iter(o.values())).argmax() for o in out]
        return {"label agreement": float(np.mean(np.array(a) == np.array(b)))}

    return Task("magika", calib, evaluation, evaluation[0], score)


def silero(name: str, n_calib: int) -> Task:
    audio = build_corpus.voiced_signal(seconds=4.0)
    state = np.zeros((2, 1, 128), np.float32)
    chunks = [audio[i * 512 : (i + 1) * 512][None] for i in range(len(audio) // 512)]
    feeds = [{"input": c, "state": state, "sr": np.array(16000, np.int64)} for c in chunks]
    # calibration samples carry the state the float model really has at that chunk
    import onnxruntime as ort

    session = ort.InferenceSession(str(corpus.get(name).path), providers=["CPUExecutionProvider"])
    streamed = []
    for feed in feeds:
        streamed.append({**feed, "state": state})
        state = session.run(["stateN"], streamed[-1])[0]

    def score(ref, out):
        a = np.array([r["output"].ravel()[0] for r in ref])
        b = np.array([o["output"].ravel()[0] for o in out])
        return {"max abs prob error": float(np.abs(a - b).max())}

    return Task(name, streamed[:n_calib], feeds, streamed[3], score, stateful=True)


def wide_mlp(n_calib: int, name: str = "wide_mlp") -> Task:
    """The over-parameterised MLP of models/train_wide_mlp.py (or the CNN of
    models/train_wide_cnn.py, ``name`` wide_cnn): its calibration split (8 digits a
    sample), and its held-out split scored against the labels."""
    import importlib

    builder = importlib.import_module(f"train_{name}")
    builder.build()
    folder = builder.out_dir()
    calib = [dict(np.load(f)) for f in sorted((folder / "calib").glob("*.npz"))][:n_calib]
    with np.load(folder / "test.npz") as arrays:
        x, labels = arrays["x"], arrays["label"]
    evaluation = [{"x": x[i : i + 8]} for i in range(0, len(x), 8)]

    def score(ref, out):
        a = np.concatenate([r["probs"].argmax(1) for r in ref])
        b = np.concatenate([o["probs"].argmax(1) for o in out])
        return {
            "accuracy": float(np.mean(b == labels)),
            "fp32 accuracy": float(np.mean(a == labels)),
            "agreement": float(np.mean(a == b)),
        }

    return Task(name, calib, evaluation, {"x": x[:1]}, score)


def model_path(name: str) -> Path:
    """The ONNX file of a task's model (the wide MLP is built here, not fetched)."""
    if name in ("wide_mlp", "wide_cnn"):
        import importlib

        return importlib.import_module(f"train_{name}").build()
    return corpus.get(name).path


def get(name: str, n_calib: int) -> Task:
    if name.startswith("silero"):
        return silero(name, n_calib)
    if name == "wide_cnn":
        return wide_mlp(n_calib, name)
    return {"minilm": minilm, "ppocr_rec": ppocr_rec, "ppocr_cls": ppocr_cls,
            "ppocr_det": ppocr_det, "magika": magika, "wide_mlp": wide_mlp}[name](n_calib)  # fmt: skip


def run_task(session, task: Task) -> list[dict]:
    """Outputs of an onnxruntime session on the task's evaluation samples (state carried
    from one chunk to the next for recurrent models)."""
    names = [o.name for o in session.get_outputs()]
    outputs = []
    state = None
    for feed in task.evaluation:
        feed = dict(feed)
        if task.stateful and state is not None:
            feed["state"] = state
        values = dict(zip(names, session.run(None, feed), strict=True))
        if task.stateful:
            state = values.get("stateN")
        outputs.append(values)
    return outputs
