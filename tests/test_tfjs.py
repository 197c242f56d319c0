"""The TFJS graph interpreter on small hand-built graphs: TF padding semantics, fused ops, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fluxguard.recognition.tfjs import Node, TFJSGraph, _same_pads


def conv_graph(op: str, w: torch.Tensor, stride: int, padding: str, fused: list[str] | None = None) -> TFJSGraph:
    attrs = {"strides": [1, stride, stride, 1], "padding": padding, "dilations": [1, 1, 1, 1]}
    inputs = ["x", "w"]
    consts = {"w": w}
    if fused:
        attrs["fused_ops"] = fused
        inputs.append("b")
        consts["b"] = torch.linspace(-1, 1, w.shape[-1] if "Depthwise" not in op else w.shape[2] * w.shape[3])
    nodes = [Node("x", "Placeholder"), Node("w", "Const")] + ([Node("b", "Const")] if fused else [])
    nodes.append(Node("y", op, inputs, attrs))
    return TFJSGraph(nodes, consts)


@pytest.mark.parametrize("size,k,stride", [(8, 3, 2), (7, 3, 2), (9, 4, 1), (6, 1, 2)])
def test_same_padding_is_tf_asymmetric(size: int, k: int, stride: int) -> None:
    before, after = _same_pads(size, k, stride)
    out = -(-size // stride)
    assert before + after == max((out - 1) * stride + k - size, 0)
    assert after - before in (0, 1)  # TF puts the odd pixel at the end
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, size, size, 3, generator=g)
    w = torch.randn(k, k, 3, 5, generator=g)
    y = conv_graph("Conv2D", w, stride, "SAME")(x)
    ref = F.conv2d(F.pad(x.permute(0, 3, 1, 2), (before, after, before, after)), w.permute(3, 2, 0, 1), stride=stride)
    assert y.shape == (1, out, out, 5)
    torch.testing.assert_close(y, ref.permute(0, 2, 3, 1))


def test_fused_depthwise_with_bias_and_relu() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 6, 4, generator=g)
    w = torch.randn(3, 3, 4, 2, generator=g)  # channel multiplier 2
    graph = conv_graph("FusedDepthwiseConv2dNative", w, 1, "VALID", ["BiasAdd", "Relu"])
    y = graph(x)
    wt = w.permute(2, 3, 0, 1).reshape(8, 1, 3, 3)
    ref = F.relu(F.conv2d(x.permute(0, 3, 1, 2), wt, groups=4).permute(0, 2, 3, 1) + graph.const("b"))
    torch.testing.assert_close(y, ref)


def test_reductions_reshape_and_static_consts_and_roundtrip(tmp_path) -> None:
    nodes = [Node("x", "Placeholder"), Node("axes", "Const"), Node("shape", "Const"), Node("alpha", "Const"),
             Node("m", "Mean", ["x", "axes"], {"keep_dims": False}),
             Node("p", "Prelu", ["m", "alpha"]),
             Node("r", "Reshape", ["p", "shape"])]
    graph = TFJSGraph(nodes, {"alpha": torch.full((3,), 0.5)}, {"axes": [1, 2], "shape": [-1, 3]})
    x = torch.randn(2, 4, 4, 3)
    y = graph(x)
    ref = x.mean((1, 2))
    torch.testing.assert_close(y, torch.where(ref > 0, ref, 0.5 * ref))
    path = tmp_path / "g.safetensors"
    graph.save_safetensors(path, dtype=torch.float16, metadata={"source": "test"})
    again = TFJSGraph.load_safetensors(path)
    torch.testing.assert_close(again(x), y)
    first = path.read_bytes()
    graph.save_safetensors(path, dtype=torch.float16, metadata={"source": "test"})
    assert path.read_bytes() == first  # byte-reproducible


def test_unsupported_op_is_named() -> None:
    with pytest.raises(NotImplementedError, match="FancyOp"):
        TFJSGraph([Node("x", "Placeholder"), Node("y", "FancyOp", ["x"])], {})


def test_gradients_reach_the_input() -> None:
    w = torch.randn(3, 3, 3, 4)
    graph = conv_graph("_FusedConv2D", w, 2, "SAME", ["BiasAdd", "Relu6"])
    x = torch.rand(1, 9, 9, 3, requires_grad=True)
    graph(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in graph.buffers())
    assert np.isfinite(x.grad.numpy()).all()
