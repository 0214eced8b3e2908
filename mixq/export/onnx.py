"""Standard formats, generated from the integer model (the file is the contract):

- ONNX with QuantizeLinear/DequantizeLinear pairs: weights as int8 codes with per-channel scales,
  activations clipped to each site's learned range (Clip) before the int8/uint8 QuantizeLinear,
  so sub-8-bit sites keep their own range inside 8-bit containers; onnxruntime runs it.
- QONNX: the same graph with `Quant` nodes (domain qonnx.custom_op.general) that carry each site's
  arbitrary bit width, per output channel for weights.

The graph input is the normalized float image (N, C, H, W), as the PyTorch model takes it.
"""

from __future__ import annotations

import numpy as np

from .intmodel import IntModel

QONNX_DOMAIN = "qonnx.custom_op.general"
OPSET = 19


def _step(mult: int, exp: int) -> float:
    return float(mult) * 2.0**exp


class _Graph:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base.replace('.', '_')}_{self.count}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, domain: str = "", **attrs) -> str:
        out = self.name(base)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out


def _quantize(g: _Graph, x: str, quant: dict, qonnx: bool, base: str) -> str:
    """Clip to the site's range, then Q/DQ (ONNX) or Quant (QONNX)."""
    step = _step(quant.get("mult", 1), quant["exp"])
    lo = -quant["n"] * step if quant["signed"] else 0.0
    x = g.node("Clip", [x, g.const(base + "_lo", np.float32(lo)),
                        g.const(base + "_hi", np.float32(quant["n"] * step))], base + "_clip")
    if qonnx:
        inputs = [x, g.const(base + "_s", np.float32(step)), g.const(base + "_z", np.float32(0)),
                  g.const(base + "_b", np.float32(quant["bits"]))]
        return g.node("Quant", inputs, base + "_quant",
                      domain=QONNX_DOMAIN, signed=int(quant["signed"]), narrow=int(quant["signed"]),
                      rounding_mode="ROUND")
    dtype = np.int8 if quant["signed"] else np.uint8
    s, z = g.const(base + "_s", np.float32(step)), g.const(base + "_z", dtype(0))
    q = g.node("QuantizeLinear", [x, s, z], base + "_q")
    return g.node("DequantizeLinear", [q, s, z], base + "_dq")


def _weight(g: _Graph, model: IntModel, layer: dict, qonnx: bool) -> str:
    name = layer["name"]
    codes = model.weight_codes(layer)
    slices = model.tensors[f"{name}.w_slices"].astype(np.int64)
    mult = model.tensors.get(f"{name}.w_mult", np.ones(len(slices))).astype(np.float64)
    per = codes.shape[0] // len(slices)
    steps = np.repeat(mult * np.exp2(slices[:, 1].astype(np.float64)), per).astype(np.float32)
    if qonnx:
        # Float weights on the grid through Quant nodes with per-channel scales. qonnx's executor
        # takes one bit width per Quant node, so the channels of each width get their own node
        # (the others are zero there, and Quant(0) = 0) and a Sum joins them.
        shape = (-1,) + (1,) * (codes.ndim - 1)
        bits = np.repeat(slices[:, 0], per)
        scale = g.const(name + "_ws", steps.reshape(shape))
        parts = []
        for b in sorted(set(bits.tolist())):
            mask = (bits == b).reshape(shape)
            w = g.const(f"{name}_w{b}", np.where(mask, codes * steps.reshape(shape), 0).astype(np.float32))
            parts.append(g.node("Quant", [w, scale, g.const(name + "_wz", np.float32(0)),
                                          g.const(f"{name}_wb{b}", np.float32(b))],
                                f"{name}_wquant{b}", domain=QONNX_DOMAIN, signed=1, narrow=1,
                                rounding_mode="ROUND"))
        return parts[0] if len(parts) == 1 else g.node("Sum", parts, name + "_w")
    if np.abs(codes).max() > 127:
        raise ValueError(f"layer {name}: codes above 8 bits do not fit ONNX's int8 QDQ")
    return g.node("DequantizeLinear", [g.const(name + "_wq", codes.astype(np.int8)),
                                       g.const(name + "_ws", steps),
                                       g.const(name + "_wz", np.zeros(len(steps), np.int8))],
                  name + "_wdq", axis=0)


def _bias(g: _Graph, model: IntModel, layer: dict) -> list[str]:
    name = layer["name"]
    if f"{name}.bias" not in model.tensors:
        return []
    slices = model.tensors[f"{name}.w_slices"].astype(np.int64)
    mult = model.tensors.get(f"{name}.w_mult", np.ones(len(slices))).astype(np.float64)
    per = layer["weight_shape"][0] // len(slices)
    w_step = np.repeat(mult * np.exp2(slices[:, 1].astype(np.float64)), per)
    q = layer["in_quant"]
    grid = w_step * _step(q.get("mult", 1), q["exp"])
    return [g.const(name + "_bias", (model.tensors[f"{name}.bias"] * grid).astype(np.float32))]


def to_onnx(model: IntModel, qonnx: bool = False, batch: int | str = "N"):
    """An onnx.ModelProto of the integer model (QDQ, or QONNX Quant nodes when `qonnx`). The batch
    dimension is symbolic unless `batch` fixes it (qonnx's executor wants fixed shapes)."""
    from onnx import TensorProto, helper

    g = _Graph()
    values: dict[str, str] = {}
    shape = model.manifest["input_shape"]
    graph_input = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *shape])
    for node in model.manifest["graph"]:
        op, name = node["op"], node["name"]
        args = [values[i] for i in node["inputs"]]
        if op == "input":
            values[name] = "input"
            continue
        if op == "output":
            values[name] = g.node("Identity", args, "output")
            continue
        x = args[0] if args else None
        if op in ("conv", "linear"):
            layer = model.manifest["layers"][node["layer"]]
            xq = _quantize(g, x, layer["in_quant"], qonnx, layer["name"] + "_in")
            w = _weight(g, model, layer, qonnx)
            if op == "conv":
                (ph, pw), (sh, sw), (dh, dw) = layer["padding"], layer["stride"], layer["dilation"]
                out = g.node("Conv", [xq, w, *_bias(g, model, layer)], layer["name"], pads=[ph, pw, ph, pw],
                             strides=[sh, sw], dilations=[dh, dw], group=layer["groups"])
            else:
                out = g.node("Gemm", [xq, w, *_bias(g, model, layer)], layer["name"], transB=1)
        elif op == "quant":
            if node.get("cap") is not None:
                x = g.node("Clip", [x, "", g.const(name + "_cap", np.float32(node["cap"]))], name + "_cap")
            out = _quantize(g, x, node["quant"], qonnx, name)
        elif op == "relu":
            out = g.node("Relu", [x], name)
        elif op == "relu6":
            bounds = [g.const(name + "_0", np.float32(0)), g.const(name + "_6", np.float32(6))]
            out = g.node("Clip", [x, *bounds], name)
        elif op == "identity":
            out = x
        elif op == "add":
            out = g.node("Add", args, name)
        elif op in ("maxpool", "avgpool"):
            (ph, pw) = node["padding"]
            kw = {"count_include_pad": 1} if op == "avgpool" else {}
            out = g.node("MaxPool" if op == "maxpool" else "AveragePool", [x], name,
                         kernel_shape=node["kernel"], strides=node["stride"], pads=[ph, pw, ph, pw], **kw)
        elif op == "gap":
            out = g.node("GlobalAveragePool", [x], name)
            if not node.get("keepdim", True):
                out = g.node("Flatten", [out], name + "_flat", axis=1)
        elif op == "flatten":
            out = g.node("Flatten", [x], name, axis=1)
        elif op == "subsample":
            big = np.iinfo(np.int64).max
            spec = [np.array([0, 0]), np.array([big, big]), np.array([2, 3]), np.array(node["stride"])]
            out = g.node("Slice", [x, *(g.const(f"{name}_{i}", v) for i, v in enumerate(spec))], name)
        elif op == "pad_channels":
            lo, hi = node["pad"]
            out = g.node("Pad", [x, g.const(name + "_p", np.array([0, lo, 0, 0, 0, hi, 0, 0]))], name,
                         mode="constant")
        else:
            raise ValueError(f"no ONNX form for op {op!r}")
        values[name] = out
    last = values[model.manifest["graph"][-1]["name"]]
    classes = model.manifest.get("num_classes")
    output = helper.make_tensor_value_info(last, TensorProto.FLOAT, [batch, classes])
    graph = helper.make_graph(g.nodes, "mixq", [graph_input], [output], g.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if qonnx:
        opsets.append(helper.make_opsetid(QONNX_DOMAIN, 1))
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="mixq")
    proto.ir_version = 9
    return proto


def run_onnxruntime(proto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.astype(np.float32)})[0]


def run_qonnx(proto, x: np.ndarray) -> np.ndarray:
    """Execute a QONNX model (built with batch=len(x)) with the qonnx package's executor."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    wrapped = ModelWrapper(proto).transform(InferShapes())
    out_name = wrapped.graph.output[0].name
    return execute_onnx(wrapped, {"input": x.astype(np.float32)})[out_name]
