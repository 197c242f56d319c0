"""faceplugin MobileFaceNet-512 (ArcFace-style, PReLU), an extra held-out judge; weights NOT shipped.

The model comes as ``model/fr_feature.onnx`` in npm ``faceplugin-face-recognition-js@0.0.1``. The package says MIT,
but its LICENSE is a generic template and the model comes from a commercial SDK vendor, so its provenance and licence
are unclear: fluxguard never redistributes it. On first use the ONNX graph (Conv / PRelu / Add / Reshape) is
rewritten into a :class:`~fluxguard.recognition.tfjs.TFJSGraph` (NHWC) and saved in the user cache; that needs the
``onnx`` package (``pip install 'fluxguard[convert]'``) and the npm tarball (fetched with ``npm pack`` when npm is
installed).

Preprocessing: ArcFace 112 alignment (their JS derives the 5 points from 68), ``(x - 127) / 128``. Their JS feeds
RGB; BGR separates identities better here (see ``bgr`` below), which suggests the model was trained on OpenCV
(BGR) images, so BGR is used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fluxguard.errors import FluxguardError, MissingDependencyError
from fluxguard.faces.align import ARCFACE_112
from fluxguard.recognition.base import CropSpec, RecognizerSpec
from fluxguard.recognition.graph import GraphRecognizer
from fluxguard.recognition.sources import find_npm_tarball, read_tar_member, sha256_bytes
from fluxguard.recognition.tfjs import Node, TFJSGraph

PACKAGE = ("faceplugin-face-recognition-js", "0.0.1")
MEMBER = "model/fr_feature.onnx"


def onnx_to_graph(model_bytes: bytes) -> TFJSGraph:
    """Rewrite a plain NCHW ONNX CNN (Conv, PRelu, Add, Reshape to (N, D)) as an NHWC TFJSGraph.

    Conv weights OIHW become HWIO (grouped convs with one input channel per group become depthwise HWC1), ONNX's
    explicit pads become TF ``EXPLICIT`` paddings, PRelu slopes (C, 1, 1) become (C,).
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise MissingDependencyError("onnx", "convert", "converting the faceplugin model") from e
    m = onnx.load_from_string(model_bytes)
    g = m.graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(g.output) + list(g.value_info)}
    consts: dict[str, torch.Tensor] = {}
    statics: dict[str, list] = {}
    (inp,) = [i.name for i in g.input if i.name not in init]
    nodes = [Node(inp, "Placeholder")]

    def const(name: str, value: np.ndarray) -> str:
        consts[name] = torch.from_numpy(np.array(value, dtype=np.float32))
        nodes.append(Node(name, "Const"))
        return name

    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        out = n.output[0]
        if n.op_type == "Conv":
            w = init[n.input[1]]
            cout, cin_g, kh, kw = w.shape
            group = int(attrs.get("group", 1))
            t, lft, b, r = attrs.get("pads", [0, 0, 0, 0])
            sh, sw = attrs.get("strides", [1, 1])
            conv_attrs = {"strides": [1, sh, sw, 1], "padding": "EXPLICIT", "dilations": [1, 1, 1, 1],
                          "explicit_paddings": [0, 0, t, b, lft, r, 0, 0], "fused_ops": ["BiasAdd"]}
            if group == 1:
                op, wt = "_FusedConv2D", w.transpose(2, 3, 1, 0)
            elif cin_g == 1 and group == cout:
                op, wt = "FusedDepthwiseConv2dNative", w.transpose(2, 3, 0, 1)
            else:
                raise NotImplementedError(f"grouped conv with {group} groups of {cin_g} channels")
            bias = init[n.input[2]] if len(n.input) > 2 else np.zeros(cout, np.float32)
            inputs = [n.input[0], const(f"{out}/weights", wt), const(f"{out}/bias", bias)]
            nodes.append(Node(out, op, inputs, conv_attrs))
        elif n.op_type == "PRelu":
            nodes.append(Node(out, "Prelu", [n.input[0], const(f"{out}/alpha", init[n.input[1]].reshape(-1))]))
        elif n.op_type == "Add":
            nodes.append(Node(out, "AddV2", list(n.input)))
        elif n.op_type == "Reshape":
            # ONNX flattens in NCHW order: go back to NCHW first; the batch is free, the rest from the declared shape
            dims = shapes.get(out)
            if dims is None or len(dims) != 2:
                raise NotImplementedError("ONNX Reshape to anything but a declared (N, D) shape")
            statics[f"{out}/perm"] = [0, 3, 1, 2]
            statics[f"{out}/shape"] = [-1, dims[1]]
            nodes += [Node(f"{out}/perm", "Const"), Node(f"{out}/shape", "Const"),
                      Node(f"{out}/nchw", "Transpose", [n.input[0], f"{out}/perm"]),
                      Node(out, "Reshape", [f"{out}/nchw", f"{out}/shape"])]
        else:
            raise NotImplementedError(f"ONNX op {n.op_type!r} in the faceplugin model")
    return TFJSGraph(nodes, consts, statics, [g.output[0].name])


class FacepluginMFN512(GraphRecognizer):
    """faceplugin MobileFaceNet-512: a held-out judge, converted on the fly (never shipped)."""

    pixel_offset = 127.0
    pixel_scale = 128.0
    bgr = True
    spec = RecognizerSpec(
        name="faceplugin-mfn512",
        family="MobileFaceNet-512 (faceplugin SDK, ArcFace-style)",
        embedding_size=512,
        input="112x112 BGR ArcFace-aligned, (x*255 - 127) / 128",
        crop=CropSpec(112, tuple(map(tuple, ARCFACE_112.tolist()))),
        source="npm faceplugin-face-recognition-js@0.0.1: model/fr_feature.onnx",
        source_sha256="87aacdfe57510db2af90c0251df680e8eec88f122ee94712121d09bcaaaf3581",
        license="unclear (package.json says MIT; LICENSE is a generic template; commercial SDK vendor): "
                "evaluation only, not redistributed",
        weights_file=None,
        notes="converted from ONNX into the user cache on first use; needs `onnx` and the npm tarball",
    )

    @classmethod
    def convert(cls, dest: Path, download: bool = True) -> None:
        data = read_tar_member(find_npm_tarball(*PACKAGE, download=download), MEMBER)
        digest = sha256_bytes(data)
        if digest != cls.spec.source_sha256:
            raise FluxguardError(f"{MEMBER} has sha256 {digest}, expected {cls.spec.source_sha256}")
        onnx_to_graph(data).save_safetensors(dest, metadata={"source": cls.spec.source, "source_sha256": digest})
