"""ONNX blocks as PyTorch modules (onnx2torch), with the converters onnx2torch lacks.

Only :mod:`mixq_onnx.runtime.brecq` imports this module, and only when ``--method
brecq`` runs: PyTorch and onnx2torch are the optional extra ``[brecq]``.

Block reconstruction feeds every quantized weight to the block as an
input, so a convolution's weight is a tensor computed each step, not a
stored parameter. onnx2torch's Conv converter takes its weight from an
initializer and rejects ``auto_pad`` SAME_UPPER/SAME_LOWER; the converter
registered here takes over in both cases and keeps onnx2torch's otherwise.
Comparison ops without a converter (GreaterOrEqual, LessOrEqual) are added
too. Every converted block is still checked against ONNX Runtime before it
is trusted (:func:`mixq_onnx.runtime.brecq.reconstruct`).
"""

from __future__ import annotations

import logging
import math
import sys
import types

import onnx
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _guard_torchvision() -> None:
    """Let onnx2torch import even when torchvision is installed but unusable.

    onnx2torch imports torchvision for its NonMaxSuppression and RoiAlign
    converters only. A torchvision built for another PyTorch (a CUDA build
    beside a CPU one, say) raises at import ("operator torchvision::nms does
    not exist"), which would make every block unconvertible. Then a stand-in
    module takes its place whose ops raise, so only blocks with those two ops
    fall back, with the reason.
    """
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # RuntimeError from its C++ ops, or ImportError
        reason = f"torchvision is not usable here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

        def unavailable(*args: object, **kwargs: object) -> None:
            raise NotImplementedError(reason)

        stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.nms = ops.box_convert = ops.roi_align = unavailable  # type: ignore[attr-defined]
        stub.ops = ops  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
        log.info("%s; NonMaxSuppression and RoiAlign blocks will fall back", reason)


_guard_torchvision()

from onnx2torch import convert as _onnx2torch_convert  # noqa: E402
from onnx2torch.node_converters import registry  # noqa: E402
from onnx2torch.onnx_graph import OnnxGraph  # noqa: E402
from onnx2torch.onnx_node import OnnxNode  # noqa: E402
from onnx2torch.utils.common import (  # noqa: E402
    OnnxMapping,
    OnnxToTorchModule,
    OperationConverterResult,
    onnx_mapping_from_node,
)
from torch import nn  # noqa: E402

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ConvBase(nn.Module, OnnxToTorchModule):
    """The attributes Conv and ConvTranspose share, with ONNX's defaults for a weight of a given rank."""

    def __init__(self, attrs: dict) -> None:
        super().__init__()
        self.strides = attrs.get("strides")
        self.dilations = attrs.get("dilations")
        self.group = int(attrs.get("group", 1))
        self.pads = attrs.get("pads")

    def _common(self, rank: int) -> tuple[list[int], list[int], list[int]]:
        """Strides, dilations and pads (begins then ends) for ``rank`` spatial axes."""
        return (list(self.strides or [1] * rank), list(self.dilations or [1] * rank),
                list(self.pads or [0] * (2 * rank)))


class DynamicConv(_ConvBase):
    """ONNX Conv with the weight (and bias) as inputs and every padding mode, including auto_pad SAME_*."""

    def __init__(self, attrs: dict) -> None:
        super().__init__(attrs)
        self.auto_pad = attrs.get("auto_pad", "NOTSET")

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        rank = w.dim() - 2
        strides, dil, pads = self._common(rank)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for d in range(rank):
                size = x.shape[2 + d]
                out = math.ceil(size / strides[d])
                total = max((out - 1) * strides[d] + (w.shape[2 + d] - 1) * dil[d] + 1 - size, 0)
                small, big = total // 2, total - total // 2
                begin.append(small if self.auto_pad == "SAME_UPPER" else big)
                end.append(big if self.auto_pad == "SAME_UPPER" else small)
        elif self.auto_pad == "VALID":
            begin = end = [0] * rank
        else:
            begin, end = pads[:rank], pads[rank:]
        if begin == end:
            return _CONV[rank](x, w, b, strides, begin, dil, self.group)
        # F.pad takes the last axis first.
        flat = [p for d in reversed(range(rank)) for p in (begin[d], end[d])]
        return _CONV[rank](F.pad(x, flat), w, b, strides, 0, dil, self.group)


class DynamicConvTranspose(_ConvBase):
    """ONNX ConvTranspose with the weight as an input (explicit pads and output_padding; no auto_pad, no output_shape)."""

    def __init__(self, attrs: dict) -> None:
        super().__init__(attrs)
        self.output_padding = attrs.get("output_padding")

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        rank = w.dim() - 2
        strides, dil, pads = self._common(rank)
        extra = list(self.output_padding or [0] * rank)
        y = _CONV_T[rank](x, w, b, strides, 0, extra, self.group, dil)
        index = [slice(None), slice(None)] + [slice(pads[d], y.shape[2 + d] - pads[rank + d]) for d in range(rank)]
        return y[tuple(index)]


class Reshape(nn.Module, OnnxToTorchModule):
    """ONNX Reshape with either ``allowzero`` (onnx2torch implements only allowzero=0)."""

    def __init__(self, allowzero: int) -> None:
        super().__init__()
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = [int(d) for d in shape.tolist()]
        if not self.allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return torch.reshape(x, dims)


_REDUCE = {
    "ReduceMean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


class Reduce(nn.Module, OnnxToTorchModule):
    """ONNX Reduce* from opset 18 on, where ``axes`` is an optional input (onnx2torch stops at opset 13)."""

    def __init__(self, op: str, keepdims: int, noop_with_empty_axes: int) -> None:
        super().__init__()
        self.op, self.keepdims, self.noop = op, bool(keepdims), bool(noop_with_empty_axes)

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = [int(a) for a in axes.tolist()] if axes is not None else []
        if not dims:
            if self.noop:
                return x
            dims = list(range(x.dim()))
        return _REDUCE[self.op](x, dims, self.keepdims)


def _reduce_converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs = _attrs(node)
    module = Reduce(node.operation_type, int(attrs.get("keepdims", 1)), int(attrs.get("noop_with_empty_axes", 0)))
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


class Gelu(nn.Module, OnnxToTorchModule):
    """ONNX Gelu (opset 20), exact or tanh-approximated."""

    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


class Recurrent(nn.Module, OnnxToTorchModule):
    """ONNX LSTM or GRU with its weights as inputs: both directions and layouts, default activations.

    Peepholes, clipping, custom activations, ``input_forget`` and
    ``sequence_lens`` are refused at conversion (the block then falls back).
    Gate orders are ONNX's: LSTM i, o, f, c; GRU z, r, h.
    """

    def __init__(self, op: str, hidden: int, direction: str, layout: int, linear_before_reset: int) -> None:
        super().__init__()
        self.op, self.hidden, self.layout, self.lbr = op, hidden, layout, bool(linear_before_reset)
        self.directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]

    def forward(self, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None = None,
                sequence_lens: torch.Tensor | None = None, initial_h: torch.Tensor | None = None,
                initial_c: torch.Tensor | None = None):
        if self.layout:
            x = x.transpose(0, 1)
            initial_h = initial_h.transpose(0, 1) if initial_h is not None else None
            initial_c = initial_c.transpose(0, 1) if initial_c is not None else None
        steps, batch = x.shape[0], x.shape[1]
        gates = 4 if self.op == "LSTM" else 3
        ys, hs, cs = [], [], []
        for d, reverse in enumerate(self.directions):
            wb = b[d, : gates * self.hidden] if b is not None else 0
            rb = b[d, gates * self.hidden :] if b is not None else torch.zeros(gates * self.hidden, dtype=x.dtype)
            h = initial_h[d] if initial_h is not None else x.new_zeros(batch, self.hidden)
            c = initial_c[d] if initial_c is not None else x.new_zeros(batch, self.hidden)
            xw = x @ w[d].T + wb  # every step's input projection at once
            out = [None] * steps
            for t in (reversed(range(steps)) if reverse else range(steps)):
                if self.op == "LSTM":
                    g = xw[t] + h @ r[d].T + rb
                    i, o, f, cand = g.chunk(4, dim=-1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cand)
                    h = torch.sigmoid(o) * torch.tanh(c)
                else:
                    rz, rr, rh = r[d].chunk(3, dim=0)
                    bz, br, bh = rb.chunk(3)
                    xz, xr, xh = xw[t].chunk(3, dim=-1)
                    z = torch.sigmoid(xz + h @ rz.T + bz)
                    reset = torch.sigmoid(xr + h @ rr.T + br)
                    if self.lbr:
                        cand = torch.tanh(xh + reset * (h @ rh.T + bh))
                    else:
                        cand = torch.tanh(xh + (reset * h) @ rh.T + bh)
                    h = (1 - z) * cand + z * h
                out[t] = h
            ys.append(torch.stack(out))
            hs.append(h)
            cs.append(c)
        y = torch.stack(ys, dim=1)  # [steps, directions, batch, hidden]
        y_h, y_c = torch.stack(hs), torch.stack(cs)
        if self.layout:
            y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
        return (y, y_h, y_c) if self.op == "LSTM" else (y, y_h)


def _recurrent_converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs = _attrs(node)
    defaults = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}[node.operation_type]
    acts = list(attrs.get("activations", []))
    if acts and acts != defaults * (len(acts) // len(defaults)):
        raise NotImplementedError(f"{node.operation_type} with activations {acts}")
    if "clip" in attrs or int(attrs.get("input_forget", 0)):
        raise NotImplementedError(f"{node.operation_type} with clip or input_forget")
    inputs = list(node.input_values)
    if len(inputs) > 4 and inputs[4]:
        raise NotImplementedError(f"{node.operation_type} with sequence_lens")
    if node.operation_type == "LSTM" and len(inputs) > 7 and inputs[7]:
        raise NotImplementedError("LSTM with peepholes")
    module = Recurrent(node.operation_type, int(attrs["hidden_size"]), attrs.get("direction", "forward"),
                       int(attrs.get("layout", 0)), int(attrs.get("linear_before_reset", 0)))
    return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(
        inputs=tuple(inputs[:7]), outputs=tuple(node.output_values)))


def _gelu_converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(torch_module=Gelu(_attrs(node).get("approximate", "none")), onnx_mapping=onnx_mapping_from_node(node))


class _Compare(nn.Module, OnnxToTorchModule):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fn(a, b)


def _attrs(node: OnnxNode) -> dict:
    """The node's attributes, with byte strings (auto_pad, activations, approximate) decoded."""
    text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    return {k: [text(x) for x in v] if isinstance(v, (list, tuple)) else text(v) for k, v in node.attributes.items()}


def _wrap_conv(original, dynamic_cls, auto_pad_ok: bool):
    """Keep onnx2torch's converter for constant weights and plain padding; take dynamic weights and SAME padding."""

    def converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        attrs = _attrs(node)
        pad = attrs.get("auto_pad", "NOTSET")
        constant = node.input_values[1] in graph.initializers and all(v in graph.initializers for v in node.input_values[2:])
        if constant and pad in ("NOTSET", "VALID"):
            return original(node, graph)
        if not auto_pad_ok and pad not in ("NOTSET", "VALID"):
            raise NotImplementedError(f"{node.operation_type} with auto_pad {pad} and a weight input")
        if node.operation_type == "ConvTranspose" and "output_shape" in attrs:
            raise NotImplementedError("ConvTranspose with output_shape and a weight input")
        return OperationConverterResult(torch_module=dynamic_cls(attrs), onnx_mapping=onnx_mapping_from_node(node))

    return converter


def _wrap_reshape(original):
    def converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        allowzero = int(_attrs(node).get("allowzero", 0))
        if not allowzero:
            return original(node, graph)
        return OperationConverterResult(torch_module=Reshape(allowzero), onnx_mapping=onnx_mapping_from_node(node))

    return converter


def _compare_converter(fn):
    def converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        return OperationConverterResult(torch_module=_Compare(fn), onnx_mapping=OnnxMapping(
            inputs=tuple(node.input_values), outputs=tuple(node.output_values)))

    return converter


def _register() -> None:
    """Install the converters above once (onnx2torch's registry is process-wide)."""
    table = registry._CONVERTER_REGISTRY  # onnx2torch offers add_converter, which refuses to replace an entry
    if getattr(_register, "done", False):
        return
    for key, conv in list(table.items()):
        if key.domain in ("", "ai.onnx") and key.operation_type == "Conv":
            table[key] = _wrap_conv(conv, DynamicConv, True)
        elif key.domain in ("", "ai.onnx") and key.operation_type == "ConvTranspose":
            table[key] = _wrap_conv(conv, DynamicConvTranspose, False)
        elif key.domain in ("", "ai.onnx") and key.operation_type == "Reshape":
            table[key] = _wrap_reshape(conv)
    for op, fn in (("GreaterOrEqual", torch.ge), ("LessOrEqual", torch.le)):
        for version in (12, 16):
            key = registry.OperationDescription(domain="", operation_type=op, version=version)
            table.setdefault(key, _compare_converter(fn))
    table.setdefault(registry.OperationDescription("", "Gelu", 20), _gelu_converter)
    for op in ("LSTM", "GRU"):
        for version in (7, 14, 22):
            table.setdefault(registry.OperationDescription("", op, version), _recurrent_converter)
    for op in _REDUCE:
        for version in (18, 20):
            if onnx.defs.get_schema(op, version).since_version == version:
                table[registry.OperationDescription("", op, version)] = _reduce_converter
    # onnx2torch knows each op up to some opset; newer versions of most ops only widen the types (INT4 and
    # friends at opset 21). Use the newest known converter for them: the numeric check of every block catches
    # the rare op whose meaning changed.
    newest: dict[str, tuple[int, object]] = {}
    for key, conv in table.items():
        if key.domain == "" and key.version > newest.get(key.operation_type, (0, None))[0]:
            newest[key.operation_type] = (key.version, conv)
    for schema in onnx.defs.get_all_schemas_with_history():
        known = newest.get(schema.name)
        if schema.domain == "" and known is not None and schema.since_version > known[0]:
            table.setdefault(registry.OperationDescription("", schema.name, schema.since_version), known[1])
    _register.done = True  # type: ignore[attr-defined]


def to_torch(model: onnx.ModelProto) -> nn.Module:
    """The block as a torch module whose forward takes the model's inputs in order and returns its outputs."""
    _register()
    return _onnx2torch_convert(model)


__all__ = ["DynamicConv", "DynamicConvTranspose", "Gelu", "Recurrent", "Reduce", "Reshape", "to_torch"]
