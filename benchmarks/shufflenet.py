"""ShuffleNet V2 0.5x for 28x28 grey images, its "folded" twin, and their BN-free deploy forms.

The paper's whole-model experiment (He et al., section 4.3, Table 3) trains
ShuffleNet V2 and a "folded" twin in which every depthwise 3x3 (+BN) + 1x1
pair is one regular 3x3 conv, then decomposes the folded one back into the
ShuffleNet architecture. This module holds the networks for the miniature of
that experiment on Fashion-MNIST (benchmarks/table3.py):

* ShuffleNetV2(form="dw"):     the original; a separable slot is
  dw3x3 -> BN -> 1x1 -> BN -> ReLU.
* ShuffleNetV2(form="folded"): the twin; a separable slot is
  3x3 -> BN -> ReLU (in -> out channels).

Adaptations to 28x28: the stem is a 3x3 stride-1 conv to 24 channels with no
max-pool, so the three stages run at 14x14, 7x7 and 4x4; widths are the 0.5x
ones (24, 48, 96, 192) with repeats (4, 8, 4); conv5 has CONV5 channels.

deploy(model) folds every BN into its conv and returns a DeployNet, which has
the same forward function with plain conv+bias layers. A DeployNet's slots
can also take the forms the decomposition writes (depthwise + 1x1, or the
channel baseline's k x k to c' + 1x1), with weights read from an ONNX model:
load_slots_from_onnx() follows each folded conv's output tensor name into the
decomposed graph. The stem is not part of the ONNX body the optimizer sees
(body_module), because the original ShuffleNet keeps a regular stem conv too.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

WIDTHS = (24, 48, 96, 192)
REPEATS = (4, 8, 4)
CONV5 = 512
MEAN, STD = 0.286, 0.353


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class Separable(nn.Module):
    """The slot the paper folds: dw3x3 -> BN -> 1x1 -> BN -> ReLU, or folded 3x3 -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, form: str):
        super().__init__()
        self.form = form
        if form == "dw":
            self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
            self.dw_bn = nn.BatchNorm2d(cin)
            self.pw = nn.Conv2d(cin, cout, 1, bias=False)
            self.pw_bn = nn.BatchNorm2d(cout)
        elif form == "folded":
            self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn = nn.BatchNorm2d(cout)
        else:
            raise ValueError(f"form {form!r}: choose dw or folded")

    def forward(self, x):
        if self.form == "dw":
            return torch.relu(self.pw_bn(self.pw(self.dw_bn(self.dw(x)))))
        return torch.relu(self.bn(self.conv(x)))


class Pointwise(nn.Module):
    """1x1 -> BN -> ReLU (the first conv of a branch; the same in both twins)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def unit_forward(unit, x):
    """A ShuffleNet V2 unit (Unit or DeployUnit): split or two branches, concat, shuffle."""
    if unit.stride == 1:
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat([x1, unit.sep(unit.pre(x2))], 1)
    else:
        out = torch.cat([unit.branch1(x), unit.sep(unit.pre(x))], 1)
    return channel_shuffle(out)


class Unit(nn.Module):
    """ShuffleNet V2 unit; stride 2 has two branches and doubles the channels."""

    def __init__(self, cin: int, cout: int, stride: int, form: str):
        super().__init__()
        self.stride = stride
        mid = cout // 2
        if stride == 2:
            self.branch1 = Separable(cin, mid, 2, form)
            self.pre = Pointwise(cin, mid)
        else:
            self.branch1 = None
            self.pre = Pointwise(mid, mid)
        self.sep = Separable(mid, mid, stride, form)

    def forward(self, x):
        return unit_forward(self, x)


class Body(nn.Module):
    """Everything after the stem: three stages, conv5, global pool, classifier."""

    def __init__(self, form: str, classes: int = 10):
        super().__init__()
        units, cin = [], WIDTHS[0]
        for cout, repeat in zip(WIDTHS[1:], REPEATS):
            for i in range(repeat):
                units.append(Unit(cin, cout, 2 if i == 0 else 1, form))
                cin = cout
        self.units = nn.Sequential(*units)
        self.conv5 = Pointwise(cin, CONV5)
        self.fc = nn.Linear(CONV5, classes)

    def forward(self, x):
        x = self.conv5(self.units(x))
        return self.fc(x.mean((2, 3)))


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(WIDTHS[0])

    def forward(self, x):
        return torch.relu(self.bn(self.conv((x - MEAN) / STD)))


class ShuffleNetV2(nn.Module):
    """Input [N, 1, 28, 28] in [0, 1], output [N, classes] logits."""

    def __init__(self, form: str, classes: int = 10):
        super().__init__()
        self.stem = Stem()
        self.body = Body(form, classes)

    def forward(self, x):
        return self.body(self.stem(x))


# ---------------------------------------------------------------- deploy form


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, bias: Optional[torch.Tensor] = None) -> nn.Conv2d:
    """conv followed by bn (eval statistics) as one conv with bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    groups=conv.groups, bias=True)
    with torch.no_grad():
        out.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        b = torch.zeros_like(bn.running_mean) if bias is None else bias
        out.bias.copy_((b - bn.running_mean) * scale + bn.bias)
    return out


class Slot(nn.Module):
    """A sequence of plain convs (with bias) then ReLU: the BN-free form of Separable/Pointwise/Stem."""

    def __init__(self, convs: List[nn.Conv2d], prescale: bool = False):
        super().__init__()
        self.convs = nn.Sequential(*convs)
        self.prescale = prescale

    @property
    def form(self) -> str:
        return describe_slot(self)

    def forward(self, x):
        if self.prescale:
            x = (x - MEAN) / STD
        return torch.relu(self.convs(x))


def describe_slot(slot: Slot) -> str:
    c = list(slot.convs)
    if len(c) == 1:
        return "regular" if c[0].groups == 1 and c[0].kernel_size[0] > 1 else "1x1"
    if c[0].groups > 1:
        return "dw+1x1"
    return f"channel c'={c[0].out_channels}"


class DeployUnit(nn.Module):
    def __init__(self, unit: Unit):
        super().__init__()
        self.stride = unit.stride
        self.branch1 = deploy_slot(unit.branch1) if unit.branch1 is not None else None
        self.pre = deploy_slot(unit.pre)
        self.sep = deploy_slot(unit.sep)

    def forward(self, x):
        return unit_forward(self, x)


class DeployBody(nn.Module):
    def __init__(self, body: Body):
        super().__init__()
        self.units = nn.Sequential(*[DeployUnit(u) for u in body.units])
        self.conv5 = deploy_slot(body.conv5)
        self.fc = nn.Linear(body.fc.in_features, body.fc.out_features)
        self.fc.load_state_dict(body.fc.state_dict())

    def forward(self, x):
        x = self.conv5(self.units(x))
        return self.fc(x.mean((2, 3)))


class DeployNet(nn.Module):
    """BN-free ShuffleNetV2 (the inference form every ONNX export here has)."""

    def __init__(self, net: ShuffleNetV2):
        super().__init__()
        self.stem = Slot([_fold_bn(net.stem.conv, net.stem.bn)], prescale=True)
        self.body = DeployBody(net.body)

    def forward(self, x):
        return self.body(self.stem(x))


def deploy_slot(m: nn.Module) -> Slot:
    if isinstance(m, Pointwise):
        return Slot([_fold_bn(m.conv, m.bn)])
    if m.form == "dw":
        return Slot([_fold_bn(m.dw, m.dw_bn), _fold_bn(m.pw, m.pw_bn)])
    return Slot([_fold_bn(m.conv, m.bn)])


def deploy(net: ShuffleNetV2) -> DeployNet:
    """The BN-folded twin of a trained net (eval statistics); same function in eval mode."""
    was = net.training
    net.eval()
    out = DeployNet(net)
    net.train(was)
    return out.eval()


def separable_slots(net: DeployNet) -> Dict[str, Slot]:
    """name -> the slots the paper folds/decomposes (branch1 of stride-2 units and every unit's sep)."""
    return {n: m for n, m in net.body.named_modules() if isinstance(m, Slot) and (n.endswith(".sep") or n.endswith(".branch1"))}


# ---------------------------------------------------------------- ONNX


def export_body(net: DeployNet, path, opset: int = 13) -> None:
    """The body (stem output [N, 24, 28, 28] -> logits) as ONNX, dynamic batch, parameter names kept."""
    import warnings

    body = net.body.eval()
    x = torch.zeros(1, WIDTHS[0], 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(body, (x,), str(path), input_names=["features"], output_names=["logits"],
                          dynamic_axes={"features": {0: "N"}, "logits": {0: "N"}}, opset_version=opset,
                          dynamo=False, do_constant_folding=False)


def _onnx_tables(model):
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # weights may also be Constant nodes
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    inits[node.output[0]] = numpy_helper.to_array(a.t)
    producer = {o: n for n in model.graph.node for o in n.output}
    return inits, producer


def slot_outputs(folded_onnx) -> Dict[str, str]:
    """slot name (e.g. units.3.sep) -> output tensor name of its single conv in the folded body ONNX."""
    out = {}
    for node in folded_onnx.graph.node:
        if node.op_type == "Conv" and node.input[1].endswith(".convs.0.weight"):
            out[node.input[1][: -len(".convs.0.weight")]] = node.output[0]
    return out


def read_slot_convs(decomposed_onnx, output_name: str) -> List[Tuple[np.ndarray, Optional[np.ndarray], dict]]:
    """The chain of Conv nodes that computes output_name from the slot's input, first to last.

    A rank-1 decomposition writes depthwise Conv -> 1x1 Conv; the channel
    baseline k x k Conv (c' outputs) -> 1x1 Conv; a kept layer one Conv.
    Returns (weight, bias or None, attributes) per conv.
    """
    import onnx

    inits, producer = _onnx_tables(decomposed_onnx)
    chain, tensor = [], output_name
    while True:
        node = producer.get(tensor)
        if node is None or node.op_type != "Conv":
            break
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = inits[node.input[1]]
        b = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        chain.append((w, b, attrs))
        if w.shape[2:] != (1, 1) or len(chain) == 2:  # reached the spatial conv (or a 2-conv chain)
            break
        tensor = node.input[0]
    if not chain:
        raise ValueError(f"{output_name}: no Conv produces it")
    return chain[::-1]


def _conv_from(w: np.ndarray, b: Optional[np.ndarray], attrs: dict) -> nn.Conv2d:
    group = int(attrs.get("group", 1))
    kh, kw = w.shape[2:]
    pads = attrs.get("pads", [0, 0, 0, 0])
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise ValueError(f"asymmetric pads {pads} are not supported")
    conv = nn.Conv2d(w.shape[1] * group, w.shape[0], (kh, kw), tuple(attrs.get("strides", [1, 1])),
                     (pads[0], pads[1]), dilation=tuple(attrs.get("dilations", [1, 1])), groups=group, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
        conv.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)) if b is not None else torch.zeros(w.shape[0]))
    return conv


def load_slots_from_onnx(net: DeployNet, folded_body_onnx, decomposed_body_onnx) -> Dict[str, str]:
    """Replace every slot of net (a deploy twin of the folded net) by the convs the decomposed ONNX computes it with.

    Slots are found by their output tensor names in the folded body ONNX (the
    optimizer keeps a decomposed conv's output name on its last 1x1 conv).
    Returns slot name -> form written ("dw+1x1", "channel c'=..", "regular").
    """
    outputs = slot_outputs(folded_body_onnx)
    forms = {}
    modules = dict(net.body.named_modules())
    for name, tensor in outputs.items():
        if name not in modules:
            continue
        chain = read_slot_convs(decomposed_body_onnx, tensor)
        slot = modules[name]
        slot.convs = nn.Sequential(*[_conv_from(w, b, a) for w, b, a in chain])
        forms[name] = describe_slot(slot)
    return forms
