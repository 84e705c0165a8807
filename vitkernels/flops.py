"""FLOPs of a Vision Transformer, counted analytically, and the hardware peaks that give MFU.

Convention: 2 FLOPs per multiply-add, matrix products only (LayerNorm, softmax, GELU, bias and residual adds
are a fraction of a percent and, as in timm/fvcore and ``torch.utils.flop_counter``, not counted). Per image,
with T = prefix + N tokens, width C, hidden width Ch = mlp_ratio * C, patch P, in_chans Ci, K classes:

    patch_embed   2 * N * C * Ci * P * P
    qkv           2 * T * C * 3C              (per block; x depth)
    attn_scores   2 * T * T * C               (q k^T over all heads)
    attn_values   2 * T * T * C               (softmax(.) v)
    proj          2 * T * C * C
    mlp           2 * T * C * Ch * 2          (fc1 and fc2; a gated MLP: 2 * T * 3 * C * H, its two fc1 GEMMs of
                                              width H = Ch / 2 (GluMlp) or Ch (SwiGLU) and fc2)
    attn_pool     2 * (S * C * 2C + 2 * S * C + C * C + C * Ch * 2)   SigLIP's 'map' head: kv of the S pooled tokens,
                                              one latent query's scores and values, proj, MLP; + 2 C C once per
                                              batch for the latent's q projection (the same for every image)
    head          2 * C * K                   (one pooled token; x 2 with DeiT's distillation head)

T counts every prefix token (class, register, distillation).

vit_base_patch16_224: 35.13 GFLOPs = 17.56 GMACs per image (timm reports 17.58 GMACs).

Training counts forward + backward = 3x forward (the backward does two products per forward product: model
FLOPs, as in MFU). With gradient checkpointing the blocks' forward runs twice, so the hardware FLOPs of the
blocks are 4x; ``count(..., training=True)`` returns hardware FLOPs (recompute included) and ``model_flops``
the 3x figure that MFU uses.

Each op's contract (``vitkernels/ops/<op>.py``) teaches ``torch.utils.flop_counter.FlopCounterMode`` the custom
ops of the triton (``torch.ops.vitkernels_triton``) and cuda (``torch.ops.vitkernels_C``) backends, so the counter sees
the same FLOPs whichever backend runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PARTS = ("patch_embed", "qkv", "attn_scores", "attn_values", "proj", "mlp", "attn_pool", "head")
_BLOCK_PARTS = ("qkv", "attn_scores", "attn_values", "proj", "mlp")


@dataclass(frozen=True)
class ViTShape:
    """The sizes that determine a ViT's FLOPs."""

    img_size: tuple[int, int]
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    qkv_dim: int  # output width of qkv (3C)
    mlp_hidden: int  # fc1's width (a GluMlp's packed 2H; a SwiGLU's H)
    num_prefix_tokens: int
    num_classes: int
    attn_pool: bool = False  # SigLIP's 'map' head (one latent query, the blocks' MLP width)
    pool_include_prefix: bool = False  # the attention pool reads the prefix tokens too
    num_heads: int = 1  # classifier heads: 2 with DeiT's distillation head
    mlp_macs: int = 0  # multiply-adds per token of one block's MLP; 0: 2 C mlp_hidden (plain Mlp)


def shape_of(model, image_size=None) -> ViTShape:
    """The FLOP-relevant sizes of ``model``: a vitkernels or timm VisionTransformer (same module names), a
    ``create_model`` name, or a dict of VisionTransformer constructor arguments. ``image_size`` (int or
    (H, W)) overrides the model's own."""
    if isinstance(model, str):
        from vitkernels.models import model_config

        model = model_config(model)
    if isinstance(model, dict):
        cfg = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                   mlp_ratio=4.0, class_token=True, reg_tokens=0, global_pool="token", pool_include_prefix=False)
        cfg.update(model)  # other constructor arguments do not change FLOPs
        img = cfg["img_size"] if image_size is None else image_size
        C = int(cfg["embed_dim"])
        return ViTShape(_pair(img), int(cfg["patch_size"]), int(cfg["in_chans"]), C, int(cfg["depth"]), 3 * C,
                        int(C * cfg["mlp_ratio"]), (1 if cfg["class_token"] else 0) + int(cfg["reg_tokens"]),
                        int(cfg["num_classes"]), attn_pool=cfg["global_pool"] == "map",
                        pool_include_prefix=bool(cfg["pool_include_prefix"]))
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DistributedDataParallel wrapper
    try:
        proj = model.patch_embed.proj
        blocks = list(model.blocks)
        block = blocks[0] if blocks else None
        head = model.head
    except AttributeError as exc:
        raise TypeError(f"cannot count FLOPs of {type(model).__name__}: expected a ViT with patch_embed.proj, "
                        f"blocks and head (timm names)") from exc
    img = model.patch_embed.img_size if image_size is None else image_size
    C = proj.out_channels
    attn, mlp = (block.attn, block.mlp) if block is not None else (None, None)
    if attn is None:
        qkv_dim = 3 * C
    elif getattr(attn, "qkv", None) is not None:
        qkv_dim = attn.qkv.out_features
    else:  # separate q / k / v projections (EVA-02)
        qkv_dim = sum(getattr(attn, f"{n}_proj").out_features for n in "qkv")
    fc1 = (getattr(mlp, "fc1", None) or getattr(mlp, "fc1_g", None)) if mlp is not None else None
    return ViTShape(
        img_size=_pair(img), patch_size=int(proj.kernel_size[0]), in_chans=int(proj.in_channels), embed_dim=C,
        depth=len(blocks), qkv_dim=qkv_dim,
        mlp_hidden=fc1.out_features if fc1 is not None else 0,
        mlp_macs=sum(m.in_features * m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear))
        if mlp is not None else 0,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
        num_classes=getattr(head, "out_features", 0),
        attn_pool=getattr(model, "attn_pool", None) is not None,
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        num_heads=2 if isinstance(getattr(model, "head_dist", None), torch.nn.Linear) else 1,
    )


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


@dataclass
class FlopCount:
    """FLOPs of ``batch_size`` images: ``total`` and ``by_part`` (see PARTS), plus how they were counted.

    ``total`` is hardware FLOPs (with training: forward + backward + the recomputed forward when
    ``recompute``); ``model_flops`` leaves the recomputation out (the numerator of MFU).
    """

    total: int
    by_part: dict[str, int]
    model_flops: int
    batch_size: int
    training: bool
    recompute: bool
    shape: ViTShape = field(repr=False)

    @property
    def macs(self) -> float:
        return self.total / 2

    @property
    def per_image(self) -> float:
        return self.total / self.batch_size

    def __str__(self) -> str:
        kind = "training" if self.training else "forward"
        rows = [f"{kind} FLOPs for {self.batch_size} image(s): {self.total / 1e9:.3f} GFLOPs "
                f"({self.macs / 1e9:.3f} GMACs){' incl. recompute' if self.recompute else ''}"]
        rows += [f"  {k:12s} {v / 1e9:10.4f} G  {100 * v / max(self.total, 1):5.1f}%" for k, v in self.by_part.items()]
        return "\n".join(rows)


def forward_by_part(shape: ViTShape) -> dict[str, int]:
    """Forward FLOPs of one image, by part (the attention pool's per-batch q projection is not in it: see
    ``per_batch``)."""
    H, W = shape.img_size
    P = shape.patch_size
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {P}")
    N = (H // P) * (W // P)
    T = N + shape.num_prefix_tokens
    C, L = shape.embed_dim, shape.depth
    return {
        "patch_embed": 2 * N * C * shape.in_chans * P * P,
        "qkv": L * 2 * T * C * shape.qkv_dim,
        "attn_scores": L * 2 * T * T * C,
        "attn_values": L * 2 * T * T * C,
        "proj": L * 2 * T * C * C,
        "mlp": L * 2 * T * (shape.mlp_macs or 2 * C * shape.mlp_hidden),
        "attn_pool": _attn_pool(shape, N),
        "head": 2 * C * shape.num_classes * shape.num_heads,
    }


def _attn_pool(shape: ViTShape, N: int) -> int:
    if not shape.attn_pool:
        return 0
    S = N + (shape.num_prefix_tokens if shape.pool_include_prefix else 0)  # the tokens the latent attends over
    C = shape.embed_dim
    return 2 * (S * C * 2 * C + 2 * S * C + C * C + C * shape.mlp_hidden * 2)


def per_batch(shape: ViTShape) -> int:
    """Forward FLOPs spent once per batch, whatever its size: the attention pool's q projection of its one
    learned latent (2 C^2)."""
    return 2 * shape.embed_dim * shape.embed_dim if shape.attn_pool else 0


def count(model, image_size=None, batch_size: int = 1, training: bool = False, recompute: bool | None = None
          ) -> FlopCount:
    """Analytic FLOPs of ``model`` (see the module docstring) for ``batch_size`` images.

    Args:
        model: a vitkernels/timm VisionTransformer (possibly compiled or DDP-wrapped), a model name or a
            constructor-argument dict.
        image_size: int or (H, W); default the model's.
        training: forward + backward (3x) instead of forward only.
        recompute: count the blocks' recomputed forward of gradient checkpointing; None reads
            ``model.grad_checkpointing`` (full checkpointing recomputes the blocks' GEMMs and attention,
            selective checkpointing none of them). Only matters when ``training``.
    """
    shape = shape_of(model, image_size)
    fwd = forward_by_part(shape)
    if recompute is None:
        inner = getattr(getattr(model, "_orig_mod", model), "module", getattr(model, "_orig_mod", model))
        recompute = (bool(getattr(inner, "grad_checkpointing", False))
                     and getattr(inner, "checkpoint_mode", "full") == "full")
    recompute = bool(recompute and training)
    by_part = {}
    once = per_batch(shape)
    for part, f in fwd.items():
        mult = (3 + (1 if recompute and part in _BLOCK_PARTS else 0)) if training else 1
        by_part[part] = f * mult * batch_size + (once * mult if part == "attn_pool" else 0)
    model_flops = (sum(fwd.values()) * batch_size + once) * (3 if training else 1)
    return FlopCount(sum(by_part.values()), by_part, model_flops, batch_size, training, recompute, shape)


# -- FlopCounterMode formulas for the custom ops ---------------------------------------------------------------
def register_flop_formulas(import_backends: bool = False) -> list[str]:
    """The qualified names of the custom ops whose FLOP formulas FlopCounterMode knows.

    Each op's formulas are written once, in its contract (``vitkernels/ops/<op>.py``), and registered for a
    backend's ops when that backend's op file binds to the contract (on first use of the backend). With
    ``import_backends``, the op files of every backend usable here are imported first (for the cuda backend
    that may JIT-build the extension: minutes).
    """
    from importlib import import_module

    from vitkernels.backends import CONCRETE, OPS, get_impl, why_not

    if import_backends:
        for name in CONCRETE:
            if name != "torch" and why_not(name) is None:
                for op in OPS:
                    get_impl(name).get_op(op)
    return sorted(f"{ns}::{op}_{which}" for op in OPS for ns in import_module(f"vitkernels.ops.{op}").CONTRACT.namespaces
                  for which in ("fwd", "bwd"))
