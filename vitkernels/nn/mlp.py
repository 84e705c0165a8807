"""The transformer MLPs with timm's names: ``Mlp`` (``fc1``, ``act``, ``fc2``) and the gated ones, ``GluMlp``
(one packed ``fc1`` of width 2H; timm's ``SwiGLUPacked`` is GluMlp with SiLU and ``gate_last=False``) and
``SwiGLU`` (``fc1_g``, ``fc1_x``); GEMMs with fused epilogues.

Mlp: fc1 runs bias + the activation in its epilogue; fc2 runs bias (+ the block's residual) in its epilogue.
The activations the fused epilogue computes (``ACTIVATIONS``): exact-erf GELU (the paper, timm's default),
tanh-GELU (SigLIP2, ``act_layer='gelu_tanh'``), QuickGELU (OpenAI CLIP, ``'quick_gelu'``) and SiLU (``'silu'``).

GluMlp / SwiGLU: h = act(gate) * value in one ``ops.glu_linear`` (both fc1 GEMMs share one pass over x, the
gate is applied in their epilogue; the backward keeps only the two pre-activations), then the optional norm
over H (DINOv2-giant has none; EVA-02's ``scale_mlp``), then fc2 with the residual in its epilogue. Gate
activations: SiLU, exact / tanh-GELU, sigmoid (GluMlp's default).
"""

from __future__ import annotations

import torch
from torch import nn

from vitkernels import ops

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
GLU_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "sigmoid")


class QuickGELU(nn.Module):
    """x sigmoid(1.702 x), OpenAI CLIP's approximation of GELU (timm's ``QuickGELU``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# Activation modules (by qualified class name) whose function a fused epilogue computes. nn.GELU is handled
# by its ``approximate`` attribute.
_EPILOGUE_OF_CLASS = {
    "timm.layers.activations.GELU": "gelu",
    "timm.layers.activations.GELUTanh": "gelu_tanh",
    "timm.layers.activations.QuickGELU": "quick_gelu",
    "vitkernels.nn.mlp.QuickGELU": "quick_gelu",
    "torch.nn.modules.activation.SiLU": "silu",
    "timm.layers.activations.Swish": "silu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",  # GLU gates only
    "timm.layers.activations.Sigmoid": "sigmoid",
}
# timm's activation names (timm.layers.get_act_layer) -> the epilogue's name.
_EPILOGUE_OF_NAME = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu",
                     "swish": "silu", "sigmoid": "sigmoid"}


def epilogue_activation(act, default: str = "gelu") -> str | None:
    """The fused epilogue's name for an activation (a module, a module class or factory, or timm's name of
    one; None: ``default``), or None when no kernel computes it. 'sigmoid' is a GLU gate's only: check the
    result against ``ACTIVATIONS`` or ``GLU_ACTIVATIONS``."""
    if act is None:
        return default  # timm's default act_layer (GluMlp: sigmoid, SwiGLU: SiLU)
    if isinstance(act, str):
        return _EPILOGUE_OF_NAME.get(act.lower())
    if not isinstance(act, nn.Module):
        try:
            act = act()
        except Exception:
            return None
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return _EPILOGUE_OF_CLASS.get(f"{type(act).__module__}.{type(act).__qualname__}")


def activation_module(name: str) -> nn.Module:
    """The module of ``name`` (an ``ACTIVATIONS`` entry) kept in the module tree as timm's ``act``; the epilogue
    computes it, the module only says which function is meant (``epilogue_activation`` reads it back)."""
    return {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "quick_gelu": QuickGELU,
            "silu": nn.SiLU, "sigmoid": nn.Sigmoid}[name]()


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class Mlp(nn.Module):
    """x (B, N, C) -> fc2(act(fc1(x))) [+ residual], hidden width ``hidden_features``.

    ``act_layer``: as timm's (a module class, or timm's name 'gelu' | 'gelu_tanh' | 'quick_gelu' | 'silu');
    only activations in ``ACTIVATIONS`` (the fused epilogue's) are accepted."""

    def __init__(self, in_features, hidden_features=None, out_features=None, bias=True, drop=0.0,
                 backend: str = "auto", act_layer=None, norm_layer=None, device=None, dtype=None):
        super().__init__()
        name = epilogue_activation(act_layer)
        if name not in ACTIVATIONS:
            raise ValueError(f"act_layer={act_layer!r} is not supported: the fused MLP epilogue computes "
                             f"{', '.join(ACTIVATIONS)} (timm names, or nn.GELU / nn.SiLU / timm's classes of them)")
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        bias, drop = _pair(bias), _pair(drop)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias[0], device=device, dtype=dtype)
        self.act = activation_module(name)  # kept for timm's module tree; the fused epilogue computes it
        self.drop1 = nn.Dropout(drop[0])
        self.norm = norm_layer(hidden_features, device=device, dtype=dtype) if norm_layer else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias[1], device=device, dtype=dtype)
        self.drop2 = nn.Dropout(drop[1])
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return mlp_forward(self, x, residual, self.backend)


def mlp_forward(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, backend: str) -> torch.Tensor:
    """x (B, N, C) -> fc2(drop1(act(fc1(x)))) [+ residual] for any module with timm's Mlp attribute names
    (``fc1``, ``act``, ``drop1``, ``norm``, ``fc2``, ``drop2``) whose ``act`` an epilogue computes: the
    activation in fc1's epilogue, the residual in fc2's; a gated MLP (GluMlp / SwiGLU names) goes to
    ``glu_mlp_forward``."""
    if is_gated(mlp):
        return glu_mlp_forward(mlp, x, residual, backend)
    act = epilogue_activation(mlp.act)
    h = mlp.drop1(ops.linear(x, mlp.fc1.weight, mlp.fc1.bias, activation=act, backend=backend))
    return _norm_fc2(mlp, h, residual, backend)


def _norm_fc2(mlp: nn.Module, h: torch.Tensor, residual: torch.Tensor | None, backend: str) -> torch.Tensor:
    """fc2(norm(h)) [+ residual], the residual in fc2's epilogue (with active output dropout: added after)."""
    h = mlp.norm(h)
    if mlp.training and mlp.drop2.p > 0:
        y = mlp.drop2(ops.linear(h, mlp.fc2.weight, mlp.fc2.bias, backend=backend))
        return y if residual is None else y + residual
    return ops.linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=residual, backend=backend)


def _check_glu_act(act_layer, default: str) -> str:
    name = epilogue_activation(act_layer, default=default)
    if name not in GLU_ACTIVATIONS:
        raise ValueError(f"act_layer={act_layer!r} is not supported for a gated MLP: the fused GLU epilogue gates "
                         f"with {', '.join(GLU_ACTIVATIONS)}")
    return name


class GluMlp(nn.Module):
    """timm's GluMlp: fc1 (2H wide, packed [first half; second half]), h = act(first) * second (``gate_last``
    False) or first * act(second) (True, timm's default), optional norm over H, fc2. ``hidden_features`` is
    fc1's width 2H, as timm's. ``use_conv`` (1x1 convolutions on NCHW input) is not supported."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=None, norm_layer=None,
                 bias=True, drop=0.0, use_conv=False, gate_last=True, backend: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        if use_conv:
            raise ValueError("GluMlp(use_conv=True) (1x1 convolutions on NCHW input) is not supported")
        name = _check_glu_act(act_layer, "sigmoid")
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        if hidden_features % 2:
            raise ValueError(f"GluMlp needs an even hidden width (gate and value halves), got {hidden_features}")
        bias, drop = _pair(bias), _pair(drop)
        dd = dict(device=device, dtype=dtype)
        self.chunk_dim = -1
        self.gate_last = gate_last
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias[0], **dd)
        self.act = activation_module(name)
        self.drop1 = nn.Dropout(drop[0])
        self.norm = norm_layer(hidden_features // 2, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features // 2, out_features, bias=bias[1], **dd)
        self.drop2 = nn.Dropout(drop[1])
        self.backend = backend

    def init_weights(self) -> None:
        """timm's: the second half of fc1 (the gate of timm's default gate_last=True) near zero, its bias one."""
        if self.fc1.bias is not None:
            nn.init.ones_(self.fc1.bias[self.fc1.bias.shape[0] // 2:])
        nn.init.normal_(self.fc1.weight[self.fc1.weight.shape[0] // 2:], std=1e-6)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return glu_mlp_forward(self, x, residual, self.backend)


class SwiGLU(nn.Module):
    """timm's SwiGLU: h = act(fc1_g(x)) * fc1_x(x), optional norm over H, fc2 (``hidden_features`` = H,
    rounded up to ``align_to``)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=None, norm_layer=None,
                 bias=True, drop=0.0, align_to=0, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        name = _check_glu_act(act_layer, "silu")
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        if align_to:
            hidden_features = hidden_features + (-hidden_features % align_to)
        bias, drop = _pair(bias), _pair(drop)
        dd = dict(device=device, dtype=dtype)
        self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias[0], **dd)
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias[0], **dd)
        self.act = activation_module(name)
        self.drop1 = nn.Dropout(drop[0])
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias[1], **dd)
        self.drop2 = nn.Dropout(drop[1])
        self.backend = backend

    def init_weights(self) -> None:
        """timm's: the gate projection near zero, its bias one."""
        if self.fc1_g.bias is not None:
            nn.init.ones_(self.fc1_g.bias)
        nn.init.normal_(self.fc1_g.weight, std=1e-6)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return glu_mlp_forward(self, x, residual, self.backend)


def glu_parts(mlp: nn.Module):
    """(gate_weight, gate_bias, value_weight, value_bias, activation) of a gated MLP with timm's names: SwiGLU's
    two Linears, or views of GluMlp's packed fc1 (its gradients reach the one Parameter)."""
    act = epilogue_activation(mlp.act)
    if hasattr(mlp, "fc1_g"):
        return mlp.fc1_g.weight, mlp.fc1_g.bias, mlp.fc1_x.weight, mlp.fc1_x.bias, act
    w, b = mlp.fc1.weight, mlp.fc1.bias
    H = w.shape[0] // 2
    first = (w[:H], b[:H] if b is not None else None)
    second = (w[H:], b[H:] if b is not None else None)
    gate, value = (second, first) if mlp.gate_last else (first, second)
    return gate[0], gate[1], value[0], value[1], act


def glu_mlp_forward(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, backend: str) -> torch.Tensor:
    """x (B, N, C) -> fc2(norm(drop1(act(gate) * value))) [+ residual] for timm's GluMlp / SwiGLU names."""
    gw, gb, vw, vb, act = glu_parts(mlp)
    h = mlp.drop1(ops.glu_linear(x, gw, gb, vw, vb, activation=act, backend=backend))
    return _norm_fc2(mlp, h, residual, backend)


def is_gated(mlp: nn.Module) -> bool:
    """Whether ``mlp`` is a gated MLP (timm's or vitkernels' GluMlp / SwiGLU names)."""
    return hasattr(mlp, "fc1_g") or hasattr(mlp, "gate_last")


_MLP_CLASSES = {
    "vitkernels.nn.mlp.Mlp": Mlp, "timm.layers.mlp.Mlp": Mlp,
    "vitkernels.nn.mlp.GluMlp": GluMlp, "timm.layers.mlp.GluMlp": GluMlp,
    "vitkernels.nn.mlp.SwiGLU": SwiGLU, "timm.layers.mlp.SwiGLU": SwiGLU,
}
_PARTIAL_KEYS = {Mlp: ("act_layer", "bias", "norm_layer"), GluMlp: ("act_layer", "gate_last", "bias", "norm_layer"),
                 SwiGLU: ("act_layer", "align_to", "bias", "norm_layer")}


def mlp_factory(mlp_layer):
    """timm's ``mlp_layer`` argument -> (vitkernels class, fixed keyword arguments): None / Mlp, GluMlp, SwiGLU
    (timm's classes, these, or their names), or a ``functools.partial`` of one (timm's ``SwiGLUPacked`` is
    ``partial(GluMlp, act_layer=nn.SiLU, gate_last=False)``). Raises ValueError for anything else."""
    import functools

    fixed, target = {}, mlp_layer
    if isinstance(target, functools.partial):
        if target.args:
            raise ValueError(f"mlp_layer={mlp_layer!r}: positional arguments in the partial are not supported")
        fixed, target = dict(target.keywords), target.func
    if target is None:
        cls = Mlp
    elif isinstance(target, str):
        name = target.lower().rsplit(".", 1)[-1]
        if name == "swiglupacked":
            return GluMlp, dict(act_layer="silu", gate_last=False)
        cls = {"mlp": Mlp, "glumlp": GluMlp, "swiglu": SwiGLU}.get(name)
    else:
        cls = _MLP_CLASSES.get(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}")
    if cls is None:
        raise ValueError(f"mlp_layer={mlp_layer!r} is not supported: vitkernels computes timm's Mlp, GluMlp "
                         "(SwiGLUPacked) and SwiGLU (accepted: Mlp, GluMlp, SwiGLU, or a functools.partial of one)")
    unknown = sorted(set(fixed) - set(_PARTIAL_KEYS[cls]))
    if unknown:
        raise ValueError(f"mlp_layer={mlp_layer!r}: arguments {unknown} are not supported")
    return cls, fixed
