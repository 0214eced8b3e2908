"""From a trained, fake-quantized PyTorch model to an `IntModel`: trace the graph with torch.fx,
turn every quantized layer into integer codes packed at each slice's own width, biases on the
accumulator grid, steps as power-of-two exponents (or integer multiplier and exponent), and the
first layer's input quantizer into a lookup table from uint8 pixels to codes.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.nn import functional as tF

from ..flexible import packing_used
from ..functional import quantize_uniform
from ..layers import ActQuant, QConv2d, QLinear
from ..quantizers import UniformQuantizer
from .intmodel import FORMAT, IntModel, dyadic
from .pack import pack_base_k, pack_bits

SUPPORTED = ("Conv2d/Linear with an input quantizer, ActQuant, ReLU, ReLU6, MaxPool2d, AvgPool2d, "
             "AdaptiveAvgPool2d(1), Flatten/torch.flatten, Identity, Dropout, +, x[:, :, ::s, ::s], "
             "F.pad of channels, mean over (2, 3)")


class ExportError(ValueError):
    """The model holds something the integer format cannot express exactly."""


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (QConv2d, QLinear, ActQuant)) or super().is_leaf_module(m, qualname)


def _quant_spec(q, where: str) -> dict:
    if not isinstance(q, UniformQuantizer) or q.slices != 1:
        raise ExportError(f"{where}: the activation quantizer must be a per-tensor uniform one, got "
                          f"{type(q).__name__} with {q.slices} slices")
    with torch.no_grad():
        step, qmax = q.step_and_range()
    mult, exp = dyadic(float(step))
    return {"exp": exp, "mult": mult, "n": int(torch.round(qmax / step)), "signed": bool(q.signed),
            "bits": int(q.bits_per_slice()), "elements": int(q.numel.sum())}


@torch.no_grad()
def _layer_tensors(layer, name: str, lut_input, tensors: dict) -> dict:
    """Packed codes, per-slice widths and steps, bias and (first layer) input lookup table."""
    wq = layer.w_quant
    if layer.in_quant is None:
        raise ExportError(f"layer {name} has no input quantizer: the integer model needs every conv/"
                          "linear input quantized (QuantConfig(act_site='input'))")
    if getattr(wq.cfg, "kind", None) == "flexible":  # NUUQ: codebook + packed level indices
        return _codebook_layer_tensors(layer, name, lut_input, tensors)
    if not isinstance(wq, UniformQuantizer):
        raise ExportError(f"layer {name}: weight quantizer {type(wq).__name__} is not exportable")
    if not wq.signed:
        raise ExportError(f"layer {name}: the weight quantizer is unsigned; the format stores signed codes")
    if getattr(layer, "out_quant", None) is not None:
        raise ExportError(f"layer {name} has an output quantizer, which the integer format does not "
                          "hold; quantize the next layer's input instead (QuantConfig(act_site='input'))")
    spec = _quant_spec(layer.in_quant, name)
    step, qmax = wq.step_and_range()
    w = layer.weight.detach()
    codes = quantize_uniform(w, wq.expand(step, w.dim()), wq.expand(qmax, w.dim()), True)
    bits = wq.bits_per_slice().detach().round().to(torch.int64)
    per_slice = w.numel() // wq.slices
    element_bits = np.repeat(bits.numpy(), per_slice)
    tensors[f"{name}.w_packed"] = np.frombuffer(pack_bits(codes.to(torch.int64).numpy(), element_bits, True),
                                                dtype=np.uint8)
    pairs = [dyadic(float(s)) for s in step]  # step = mult 2^exp per slice; mult = 1 for 2^k steps
    info = {"name": name, "in_quant": spec, "weight_shape": list(w.shape), "slices": wq.slices,
            "bits_min": int(bits.min()), "bits_max": int(bits.max()),
            "bits_mean": float(element_bits.mean()), "weight_bits_total": int(element_bits.sum()),
            "code_bytes": math.ceil(element_bits.sum() / 8), "codebook": False}
    return _layer_common(layer, name, lut_input, tensors, bits.tolist(), pairs, info)


def _layer_common(layer, name: str, lut_input, tensors: dict, bits: list[int], pairs: list,
                  info: dict) -> dict:
    """What uniform and codebook layers share: `w_slices` (S, 2) [bits, step exponent], `w_mult`
    when a step is not a power of two, the bias on the accumulator grid, the first layer's input
    lookup table, and the conv attributes in `info`."""
    rows = [[b, e] for b, (_, e) in zip(bits, pairs, strict=True)]
    tensors[f"{name}.w_slices"] = np.array(rows, dtype=np.int8)
    if any(m != 1 for m, _ in pairs):
        tensors[f"{name}.w_mult"] = np.array([m for m, _ in pairs], dtype=np.int16)
    info["bias_bytes"] = 0.0
    if layer.bias is not None:
        grid, top = layer.accumulator_step(), 2 ** (layer.bias_bits - 1)
        bias = torch.clamp(torch.round(layer.bias.detach().double() / grid.double()), -top, top - 1)
        tensors[f"{name}.bias"] = bias.cpu().numpy().astype(np.int32 if layer.bias_bits <= 32 else np.int64)
        info["bias_bytes"] = bias.numel() * layer.bias_bits / 8
    if lut_input is not None:  # uint8 pixel -> normalized float32 (as the loader) -> input code
        tensors[f"{name}.in_lut"] = lut_input(layer.in_quant).astype(np.int16)
    if isinstance(layer, QConv2d):
        info.update(stride=list(layer.stride), padding=list(layer.padding),
                    dilation=list(layer.dilation), groups=layer.groups)
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ExportError(f"layer {name}: only zero padding with explicit sizes is exportable")
    return info


@torch.no_grad()
def _codebook_layer_tensors(layer, name: str, lut_input, tensors: dict) -> dict:
    """A flexible (NUUQ) layer: `codebook` (S, k) int16 integer grid codes m_j, the level indices
    packed at ceil(log2 k) bits or in base k (manifest `packing`), `w_slices` (S, 2) [bits, exponent
    of the grid step]; bias and input table as for uniform layers. Level j of slice s is
    codebook[s, j] * 2^exponent[s], so the executor's integer arithmetic is unchanged."""
    wq = layer.w_quant
    if not wq.enabled or wq.signed is False:
        raise ExportError(f"layer {name}: the flexible weight quantizer is disabled or unsigned")
    if getattr(layer, "out_quant", None) is not None:
        raise ExportError(f"layer {name} has an output quantizer, which the integer format does not hold")
    spec, w, k = _quant_spec(layer.in_quant, name), layer.weight.detach(), wq.k
    idx = wq.indices(w).reshape(-1).cpu().numpy()
    packing, bits = packing_used(k, wq.cfg.packing), math.ceil(math.log2(k))
    blob = pack_base_k(idx, k) if packing == "base_k" else pack_bits(idx, np.full(idx.size, bits), False)
    tensors[f"{name}.w_packed"] = np.frombuffer(blob, dtype=np.uint8)
    tensors[f"{name}.codebook"] = wq.codes().detach().round().cpu().numpy().astype(np.int16)
    pairs = [dyadic(float(s)) for s in wq.grid_step().cpu()]
    total = 8 * len(blob) if packing == "base_k" else idx.size * bits
    info = {"name": name, "in_quant": spec, "weight_shape": list(w.shape), "slices": wq.slices,
            "bits_min": bits, "bits_max": bits, "bits_mean": total / idx.size, "weight_bits_total": total,
            "code_bytes": len(blob), "codebook": True, "levels": k,
            "packing": packing, "grid_bits": wq.b, "equivalent_bits": math.log2(k)}
    return _layer_common(layer, name, lut_input, tensors, [bits] * len(pairs), pairs, info)


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def export(model: nn.Module, input_shape: tuple[int, int, int], normalize=None,
           meta: dict | None = None) -> IntModel:
    """The integer model of a prepared, trained `model` (eval mode; BatchNorm folded).

    `input_shape` is (C, H, W). `normalize(uint8 images) -> float32` is the data pipeline's
    normalization: the first layer's input quantizer becomes a lookup table from pixels through it.
    `meta` (JSON-able) goes into the manifest.
    """
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ExportError("the model still holds BatchNorm layers: fold them before QAT with "
                          "mixq.fold_bn_ (recipe fold_bn = true); folding after training would change "
                          "what the model computes")
    was_training = model.training
    model.eval()
    try:
        graph = _Tracer().trace(model)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, dict] = {}
    nodes: list[dict] = []
    names = {}
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ExportError(f"the model must take one input tensor, it takes {len(inputs)}")

    def lut_for(quant):
        if normalize is None:
            raise ExportError("export needs the data normalization (normalize=...) for the input table")
        c = quant.num_channels
        pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, c, 16, 16)
        x = normalize(pixels.contiguous()).double()
        step, qmax = quant.step_and_range()
        codes = quantize_uniform(x, step.double(), qmax.double(), bool(quant.signed))
        return codes.reshape(c, 256).to(torch.int64).numpy()

    for node in graph.nodes:
        name = node.name
        names[node] = name
        args = [names[a] for a in node.all_input_nodes]
        entry = {"name": name, "inputs": args}
        if node.op == "placeholder":
            entry["op"] = "input"
        elif node.op == "output":
            entry["op"] = "output"
        elif inputs[0] in node.all_input_nodes and not (
                node.op == "call_module" and isinstance(modules[node.target], (QConv2d, QLinear))):
            raise ExportError(f"node {name} takes the raw image: only a quantized conv/linear layer may "
                              "(its input table maps pixels to codes)")
        elif node.op == "call_module":
            entry.update(_module_op(modules[node.target], node, layers, tensors, lut_for, inputs[0]))
        elif node.op in ("call_function", "call_method"):
            entry.update(_function_op(node))
        else:
            raise ExportError(f"node {name}: {node.op} is not exportable; supported: {SUPPORTED}")
        nodes.append(entry)
    device = next(model.parameters()).device
    with torch.no_grad():
        model.eval()
        num_classes = int(model(torch.zeros(1, *input_shape, device=device)).shape[1])
        model.train(was_training)
    manifest = {"format": FORMAT, "input_shape": list(input_shape), "num_classes": num_classes,
                "graph": nodes, "layers": layers, **(meta or {})}
    manifest["weight_bits_total"] = sum(v["weight_bits_total"] for v in layers.values())
    manifest["code_bytes"] = sum(v["code_bytes"] for v in layers.values())
    manifest["bias_bytes"] = sum(v["bias_bytes"] for v in layers.values())
    return IntModel(manifest, tensors)


def _module_op(m, node, layers, tensors, lut_for, input_node) -> dict:
    where = f"node {node.name} ({node.target})"
    if isinstance(m, (QConv2d, QLinear)):
        raw = node.args[0] is input_node
        layers[node.target] = _layer_tensors(m, node.target, lut_for if raw else None, tensors)
        return {"op": "conv" if isinstance(m, QConv2d) else "linear", "layer": node.target}
    if isinstance(m, ActQuant):
        return {"op": "quant", "quant": _quant_spec(m.quant, where), "cap": m.cap}
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return {"op": "relu6" if isinstance(m, nn.ReLU6) else "relu"}
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return {"op": "identity"}
    if isinstance(m, nn.MaxPool2d) and not m.ceil_mode and _pair(m.dilation) == [1, 1]:
        return {"op": "maxpool", "kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                "padding": _pair(m.padding)}
    if (isinstance(m, nn.AvgPool2d) and not m.ceil_mode and m.count_include_pad
            and m.divisor_override is None):
        return {"op": "avgpool", "kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                "padding": _pair(m.padding)}
    if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == [1, 1]:
        return {"op": "gap", "keepdim": True}
    if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return {"op": "flatten"}
    raise ExportError(f"{where}: {type(m).__name__} is not exportable; supported: {SUPPORTED}")


def _function_op(node) -> dict:
    target, args, kwargs = node.target, node.args, node.kwargs
    where = f"node {node.name} ({getattr(target, '__name__', target)})"
    if target in (operator.add, torch.add, "add") and len(node.all_input_nodes) == 2:
        return {"op": "add"}
    if target in (tF.relu, torch.relu, "relu"):
        return {"op": "relu"}
    rest = list(args[1:]) + list(kwargs.values())
    if target in (torch.flatten, "flatten") and rest == [1]:
        return {"op": "flatten"}
    if target in ("view", "reshape") and len(rest) == 2 and rest[1] == -1:
        return {"op": "flatten"}
    if target == "mean":
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if tuple(dims) in ((2, 3), (-2, -1)):
            return {"op": "gap", "keepdim": bool(kwargs.get("keepdim", False))}
    if target is operator.getitem and isinstance(args[1], tuple) and len(args[1]) == 4:
        a, b, c, d = args[1]
        if a == slice(None) and b == slice(None) and c.start is None and d.start is None \
                and c.stop is None and d.stop is None:
            return {"op": "subsample", "stride": [c.step or 1, d.step or 1]}
    if target is tF.pad:
        pad = list(args[1])
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None)  # None pads with zeros
        if len(pad) == 6 and pad[:4] == [0, 0, 0, 0] and mode == "constant" and value in (None, 0, 0.0):
            return {"op": "pad_channels", "pad": pad[4:]}
    raise ExportError(f"{where} is not exportable; supported: {SUPPORTED}")
