"""A roofline lower bound for a ViT training step: a MODEL, not a measurement.

For each op of one training step (forward, cross-entropy, backward, AdamW) the table gives its FLOPs, the
minimum bytes it must move to and from HBM, and the time each implies at a device's datasheet peaks:

    compute time = FLOPs / peak dense bf16 tensor-core FLOP/s
    memory time  = minimum bytes / peak HBM bandwidth
    lower bound  = max(compute time, memory time), "compute" or "memory" bound by whichever is larger

The step's lower bound is the sum of its ops' bounds (ops run one after the other, each at its own roofline),
and batch / that sum is the most images per second the op sequence can reach on that device.

Conventions:

- FLOPs: 2 per multiply-add, matrix products only (GEMMs, convolution, attention's two products), exactly
  ``vitkernels.flops.forward_by_part``; a backward GEMM does the FLOPs of its forward GEMM, attention's backward
  twice its forward (model FLOPs: a kernel that recomputes the probabilities does more). LayerNorm, GELU,
  softmax, adds and casts count 0 FLOPs. The patch embedding's backward computes only the weight gradient
  (the images need none), so the table's training FLOPs are ``flops.count(training=True)`` minus one patch
  embedding forward (0.2 % at ViT-B/16).
- Minimum bytes of an op: each tensor it reads, read once; each tensor it writes, written once. How many
  passes an implementation makes is not charged (a LayerNorm fused into a GEMM reads x once here although our
  kernels take the row statistics in a first pass; PyTorch's LayerNorm backward reads x and dy twice). What is
  fused into an op (a prologue, an epilogue, a bias gradient taken while the weight-gradient GEMM reads dy) costs
  only the extra tensors it touches. Caches are not modelled (none of these tensors fits in the 50 MB L2 at
  batch 256).
- Precision (a training step under ``torch.autocast(bfloat16)`` with fp32 parameters, as ``bench`` and
  ``train`` run it): GEMMs read bf16 copies of the weights (one fp32 -> bf16 cast per weight per step) and
  write bf16 weight gradients, cast to the fp32 ``.grad``; fused AdamW then reads parameter, gradient and the
  two moments (4 x 4 = 16 bytes per parameter) and writes parameter and moments (12 bytes). The lean
  sequence's residual stream is bf16 (the default, ``fp32_residual=False``); timm's is fp32 (its adds promote
  to fp32, its LayerNorms run in fp32 under autocast and each linear casts its input back to bf16).
- Not modelled: kernel launch latency, tile quantisation (197 tokens), the achievable fraction of either peak,
  data loading, gradient clipping, overlap between ops.

Run ``python -m vitkernels.experiments.roofline --model vit_base_patch16_224 --batch 256`` for one model's
tables, ``--doc`` for docs/roofline.md (tests/test_roofline.py checks that the committed doc equals it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vitkernels.experiments.mfu import peak_tflops
from vitkernels.flops import forward_by_part, shape_of
from vitkernels.models import model_config

DATE = "2026-12-03"
DOC_MODELS = ("vit_base_patch16_224", "vit_large_patch16_224")
DOC_BATCH = 256


@dataclass(frozen=True)
class Device:
    """Datasheet peaks: dense bf16 tensor-core TFLOP/s and HBM TB/s."""

    name: str
    tflops: float
    tbps: float
    source: str

    @property
    def ridge(self) -> float:
        """FLOP per byte above which an op is compute bound."""
        return self.tflops / self.tbps


# Dense bf16 from vitkernels.experiments.mfu.PEAK_TFLOPS (NVIDIA lists 1,979 TFLOP/s "with sparsity", i.e. 989
# dense, for both); bandwidth from the same datasheets (shared/REFERENCES.md uses 989 for the physical limit).
DEVICES = (
    Device("H100 SXM", peak_tflops("H100 SXM", "bf16"), 3.35,
           "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: BF16 1,979 TFLOPS with sparsity, 3.35 TB/s HBM3)"),
    Device("H200 SXM", peak_tflops("H200 SXM", "bf16"), 4.8,
           "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM: BF16 1,979 TFLOPS with sparsity, 4.8 TB/s HBM3e)"),
)


@dataclass(frozen=True)
class Op:
    """One op of the step: ``count`` instances (``depth`` for a block's ops), each doing ``flops`` and moving at
    least ``read`` + ``written`` bytes."""

    name: str
    phase: str  # "fwd", "bwd" or "step"
    flops: int
    read: int
    written: int
    count: int = 1

    @property
    def bytes(self) -> int:
        return self.read + self.written

    def compute_s(self, dev: Device) -> float:
        return self.count * self.flops / (dev.tflops * 1e12)

    def memory_s(self, dev: Device) -> float:
        return self.count * self.bytes / (dev.tbps * 1e12)

    def bound_s(self, dev: Device) -> float:
        return max(self.compute_s(dev), self.memory_s(dev))

    def bound(self, dev: Device) -> str:
        return "compute" if self.compute_s(dev) >= self.memory_s(dev) else "memory"


@dataclass(frozen=True)
class Sizes:
    """What the byte counts depend on: B images of Ci x Hi x Wi, N patches of P x P, T = N + prefix tokens,
    width C, heads, MLP hidden Ch, depth L, K classes; ``fwd`` the forward FLOPs per image by part
    (vitkernels.flops.forward_by_part)."""

    B: int
    Ci: int
    Hi: int
    Wi: int
    P: int
    N: int
    T: int
    C: int
    heads: int
    Ch: int
    L: int
    K: int
    qkv_bias: bool
    fwd: dict

    @property
    def R(self) -> int:
        """Token rows of the batch."""
        return self.B * self.T

    def gemm_params(self) -> int:
        """Weights and biases of the GEMMs: patch embedding, qkv, proj, fc1, fc2, head."""
        C, Ch = self.C, self.Ch
        block = 3 * C * C + 3 * C * self.qkv_bias + C * C + C + Ch * C + Ch + C * Ch + C
        return C * self.Ci * self.P ** 2 + C + self.L * block + self.K * C + self.K

    def params(self) -> int:
        """Every parameter: the GEMMs', the class token, the position embedding, the LayerNorms'."""
        return self.gemm_params() + self.C + self.T * self.C + 2 * self.C * (2 * self.L + 1)


def sizes(name_or_config: str | dict, batch: int) -> Sizes:
    """The sizes of ``batch`` images through a ``create_model`` name or a constructor-argument dict (timm
    defaults for what it leaves out)."""
    cfg = model_config(name_or_config) if isinstance(name_or_config, str) else dict(name_or_config)
    shape = shape_of(cfg)
    (Hi, Wi), P = shape.img_size, shape.patch_size
    N = (Hi // P) * (Wi // P)
    return Sizes(B=batch, Ci=shape.in_chans, Hi=Hi, Wi=Wi, P=P, N=N, T=N + shape.num_prefix_tokens,
                 C=shape.embed_dim, heads=int(cfg.get("num_heads", 12)), Ch=shape.mlp_hidden, L=shape.depth,
                 K=shape.num_classes, qkv_bias=bool(cfg.get("qkv_bias", True)), fwd=forward_by_part(shape))


# -- the op sequences ------------------------------------------------------------------------------------------
def _cast(name: str, phase: str, elems: int, src: int, dst: int, count: int = 1) -> list[Op]:
    """A dtype cast of ``elems`` values from ``src`` to ``dst`` bytes each (nothing when they are equal)."""
    return [] if src == dst else [Op(name, phase, 0, elems * src, elems * dst, count)]


def _flops(s: Sizes) -> dict:
    """Forward FLOPs of the whole batch: one block's GEMMs and attention, the patch embedding, the head."""
    f, B, L = s.fwd, s.B, s.L
    return dict(qkv=B * f["qkv"] // L, attn=B * (f["attn_scores"] + f["attn_values"]) // L, proj=B * f["proj"] // L,
                fc=B * f["mlp"] // (2 * L), patch=B * f["patch_embed"], head=B * f["head"])


def _step_ends(s: Sizes, a: int, x: int, cast: int) -> tuple[list[Op], list[Op], list[Op]]:
    """What both sequences share: (the images' cast and the parameters' casts; head + loss forward; head + loss
    backward, the parameter-gradient casts and AdamW). ``a``: bytes of an activation value, ``x``: of the pooled
    class token (the residual stream's dtype), ``cast``: how many parameters autocast / the ops cast."""
    B, C, K, F = s.B, s.C, s.K, _flops(s)
    head_w = (K * C + K) * a
    start = (_cast("images fp32 -> bf16 (autocast)", "fwd", B * s.Ci * s.Hi * s.Wi, 4, a)
             + _cast("parameters fp32 -> bf16 (once per step)", "fwd", cast, 4, a))
    head_fwd = [Op("head + cross-entropy (logits, fp32 log-probs saved)", "fwd", F["head"],
                   B * C * x + head_w, B * K * 4)]
    head_bwd = [Op("head + cross-entropy bwd (d logits, dX, dW)", "bwd", 2 * F["head"],
                   B * K * 4 + B * C * x + head_w, B * C * x + head_w)]
    end = (_cast("parameter gradients bf16 -> fp32 .grad", "bwd", cast, a, 4)
           + [Op("AdamW, fused (fp32: read p, g, m, v; write p, m, v)", "step", 0, 16 * s.params(),
                 12 * s.params())])
    return start, head_fwd, head_bwd + end


def lean_ops(s: Sizes, a: int = 2) -> list[Op]:
    """vitkernels' lean blocks (vitkernels/nn/block.py), bf16 residual stream. Per block, forward:

        ln_linear    reads x, W_qkv, b; writes qkv (3C) and the fp32 row statistics (8 bytes a row)
        attention    reads q, k, v; writes o and the fp32 log-sum-exp (4 bytes per row and head)
        proj         reads o, W, b and the residual x; writes x1 = x + o W^T + b
        ln_mlp fc1   reads x1, W1, b1; writes z (Ch) and the row statistics
        ln_mlp fc2   reads z (GELU in the prologue), W2, b2 and the residual x1; writes y = x1 + GELU(z) W2^T + b2

    Backward: every linear's dW and dX GEMMs (the LayerNorm and GELU outputs recomputed in their prologues,
    db taken with dW, db1 in the dz epilogue), the LayerNorm backward passes (ln_mlp's adds the residual's
    gradient), attention backward (reads dO, q, k, v, o, lse; writes dq, dk, dv), autograd's stack of dq, dk,
    dv into d qkv and its add of the two gradients of x (x feeds ln_linear and proj's epilogue).
    """
    R, C, Ch, B, T, L, F = s.R, s.C, s.Ch, s.B, s.T, s.L, _flops(s)
    x, z, stats, lse = R * C * a, R * Ch * a, 8 * R, 4 * B * s.heads * T  # one activation of width C, of Ch
    ln = 2 * C * a  # LayerNorm weight and bias
    w_qkv, w_proj, w1, w2 = (3 * C * C + 3 * C * s.qkv_bias) * a, (C * C + C) * a, (Ch * C + Ch) * a, (C * Ch + C) * a
    img, w_pe = B * s.Ci * s.Hi * s.Wi * a, (C * s.Ci * s.P ** 2 + C) * a
    start, head_fwd, end = _step_ends(s, a, a, s.params())  # the fused ops cast every parameter
    block_fwd = [
        Op("ln_linear: norm1 + qkv GEMM", "fwd", F["qkv"], x + ln + w_qkv, 3 * x + stats, L),
        Op("attention (flash)", "fwd", F["attn"], 3 * x, x + lse, L),
        Op("proj GEMM + bias + residual", "fwd", F["proj"], x + w_proj + x, x, L),
        Op("ln_mlp fc1: norm2 + fc1 GEMM", "fwd", F["fc"], x + ln + w1, z + stats, L),
        Op("ln_mlp fc2: GELU + fc2 GEMM + residual", "fwd", F["fc"], z + w2 + x, x, L),
    ]
    block_bwd = [
        Op("ln_mlp dW2 (+db2): dy^T GELU(z)", "bwd", F["fc"], x + z, w2, L),
        Op("ln_mlp dz = (dy W2) GELU'(z) (+db1)", "bwd", F["fc"], x + w2 + z, z + Ch * a, L),
        Op("ln_mlp dW1: dz^T LN(x1)", "bwd", F["fc"], z + x + stats + ln, w1 - Ch * a, L),
        Op("ln_mlp dLN = dz W1", "bwd", F["fc"], z + w1, x, L),
        Op("ln_mlp LayerNorm bwd (+ residual dy)", "bwd", 0, 3 * x + stats + ln, x + ln, L),
        Op("proj dW (+db)", "bwd", F["proj"], 2 * x, w_proj, L),
        Op("proj dX", "bwd", F["proj"], x + w_proj, x, L),
        Op("attention bwd", "bwd", 2 * F["attn"], 5 * x + lse, 3 * x, L),
        Op("stack dq, dk, dv -> d qkv", "bwd", 0, 3 * x, 3 * x, L),
        Op("ln_linear dW (+db): dqkv^T LN(x)", "bwd", F["qkv"], 3 * x + x + stats + ln, w_qkv, L),
        Op("ln_linear dLN = dqkv W", "bwd", F["qkv"], 3 * x + w_qkv, x, L),
        Op("ln_linear LayerNorm bwd", "bwd", 0, 2 * x + stats + ln, x + ln, L),
        Op("residual: add the two gradients of x", "bwd", 0, 2 * x, x, L),
    ]
    return (start
            + [Op("patch_embed (conv GEMM + cls + pos)", "fwd", F["patch"], img + w_pe + (T + 1) * C * a, x)]
            + block_fwd
            + [Op("final LayerNorm", "fwd", 0, x + ln, x + stats)] + head_fwd
            + [Op("class token's gradient into zeros (B, T, C)", "bwd", 0, B * C * a, x),
               Op("final LayerNorm bwd", "bwd", 0, 2 * x + stats + ln, x + ln)]
            + block_bwd
            + [Op("patch_embed bwd: dW (+ db, d pos, d cls)", "bwd", F["patch"], x + img, w_pe + (T + 1) * C * a)]
            + end)


def timm_ops(s: Sizes, a: int = 2, f: int = 4) -> list[Op]:
    """timm eager (``timm.models.vision_transformer``, SDPA flash attention) under bf16 autocast: every PyTorch
    op a kernel of its own, the residual stream (and the LayerNorms' outputs) fp32 (``f`` bytes). Per block,
    forward: norm1 (fp32), its output cast to bf16, qkv GEMM (bias in the epilogue), SDPA, proj GEMM, the
    residual add (fp32 + bf16 -> fp32), norm2, cast, fc1 GEMM, GELU, fc2 GEMM, residual add. Backward: each
    GEMM's gradient cast to bf16 where it meets the fp32 stream, dX and dW GEMMs and a db column sum per
    linear, GELU backward, the LayerNorms' backward in fp32 after casting their gradient up, autograd's adds of
    the residual gradients, SDPA backward, then ``stack`` of dq, dk, dv and a ``clone`` of the permuted result
    into qkv's layout (the backward of timm's reshape/permute/unbind)."""
    R, C, Ch, B, T, L, F = s.R, s.C, s.Ch, s.B, s.T, s.L, _flops(s)
    x, xs, z, stats, lse = R * C * a, R * C * f, R * Ch * a, 8 * R, 4 * B * s.heads * T
    ln = 2 * C * f  # fp32 LayerNorm parameters (no autocast cast)
    w_qkv, w_proj, w1, w2 = (3 * C * C + 3 * C * s.qkv_bias) * a, (C * C + C) * a, (Ch * C + Ch) * a, (C * Ch + C) * a
    img, w_pe, BNC = B * s.Ci * s.Hi * s.Wi * a, (C * s.Ci * s.P ** 2 + C) * a, B * s.N * C
    start, head_fwd, end = _step_ends(s, a, f, s.gemm_params())  # LayerNorms, pos, cls stay fp32

    def norm(i: int) -> list[Op]:
        return ([Op(f"norm{i} (LayerNorm, fp32 out)", "fwd", 0, xs + ln, xs + stats, L)]
                + _cast(f"norm{i} output -> bf16 (the linear's autocast cast)", "fwd", R * C, f, a, L))

    def norm_bwd(i: int) -> list[Op]:
        return (_cast(f"d norm{i} output bf16 -> fp32", "bwd", R * C, a, f, L)
                + [Op(f"norm{i} bwd (fp32)", "bwd", 0, 2 * xs + stats + ln, xs + ln, L),
                   Op("residual: add the two gradients of the stream (fp32)", "bwd", 0, 2 * xs, xs, L)])

    def linear_bwd(name: str, flops: int, dy: int, inp: int, w: int, bias: int) -> list[Op]:
        return ([Op(f"{name} dX", "bwd", flops, dy + w, inp, L),
                 Op(f"{name} dW", "bwd", flops, dy + inp, w - bias, L)]
                + ([Op(f"{name} db (column sum)", "bwd", 0, dy, bias, L)] if bias else []))

    block_fwd = (norm(1)
                 + [Op("qkv GEMM (+bias)", "fwd", F["qkv"], x + w_qkv, 3 * x, L),
                    Op("SDPA flash attention", "fwd", F["attn"], 3 * x, x + lse, L),
                    Op("proj GEMM (+bias)", "fwd", F["proj"], x + w_proj, x, L),
                    Op("residual add (fp32 + bf16 -> fp32)", "fwd", 0, xs + x, xs, L)]
                 + norm(2)
                 + [Op("fc1 GEMM (+bias)", "fwd", F["fc"], x + w1, z, L),
                    Op("GELU", "fwd", 0, z, z, L),
                    Op("fc2 GEMM (+bias)", "fwd", F["fc"], z + w2, x, L),
                    Op("residual add (fp32 + bf16 -> fp32)", "fwd", 0, xs + x, xs, L)])
    block_bwd = (_cast("d fc2 output fp32 -> bf16", "bwd", R * C, f, a, L)
                 + linear_bwd("fc2", F["fc"], x, z, w2, C * a)
                 + [Op("GELU bwd", "bwd", 0, 2 * z, z, L)]
                 + linear_bwd("fc1", F["fc"], z, x, w1, Ch * a)
                 + norm_bwd(2)
                 + _cast("d proj output fp32 -> bf16", "bwd", R * C, f, a, L)
                 + linear_bwd("proj", F["proj"], x, x, w_proj, C * a)
                 + [Op("SDPA flash attention bwd", "bwd", 2 * F["attn"], 5 * x + lse, 3 * x, L),
                    Op("stack dq, dk, dv", "bwd", 0, 3 * x, 3 * x, L),
                    Op("clone (permuted -> qkv layout)", "bwd", 0, 3 * x, 3 * x, L)]
                 + linear_bwd("qkv", F["qkv"], 3 * x, x, w_qkv, 3 * C * a * s.qkv_bias)
                 + norm_bwd(1))
    return (start
            + [Op("patch_embed conv (+bias)", "fwd", F["patch"], img + w_pe, BNC * a)]
            + _cast("patch tokens bf16 -> fp32 (cat's type promotion)", "fwd", BNC, a, f)
            + [Op("cat class token", "fwd", 0, BNC * f + C * f, xs),
               Op("add pos_embed", "fwd", 0, xs + T * C * f, xs)]
            + block_fwd
            + [Op("final LayerNorm (fp32)", "fwd", 0, xs + ln, xs + stats)] + head_fwd
            + [Op("class token's gradient into zeros (B, T, C)", "bwd", 0, B * C * f, xs),
               Op("final LayerNorm bwd (fp32)", "bwd", 0, 2 * xs + stats + ln, xs + ln)]
            + block_bwd
            + [Op("pos_embed, cls_token grads (batch sums)", "bwd", 0, xs, (T + 1) * C * f)]
            + _cast("d patch tokens fp32 -> bf16", "bwd", BNC, f, a)
            + [Op("patch_embed conv bwd: dW (+db)", "bwd", F["patch"], BNC * a + img, w_pe)]
            + end)


SEQUENCES = {"lean": lean_ops, "timm": timm_ops}


# -- the report ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    flops: int
    bytes: int
    bound_s: dict  # device name -> seconds
    memory_bound_s: dict  # device name -> seconds spent in memory-bound ops

    def img_per_s(self, batch: int, dev: Device) -> float:
        return batch / self.bound_s[dev.name]


def summarize(ops: list[Op], devices=DEVICES) -> Summary:
    return Summary(sum(o.count * o.flops for o in ops), sum(o.count * o.bytes for o in ops),
                   {d.name: sum(o.bound_s(d) for o in ops) for d in devices},
                   {d.name: sum(o.bound_s(d) for o in ops if o.bound(d) == "memory") for d in devices})


def op_table(ops: list[Op], devices=DEVICES) -> str:
    """The per-op markdown table: per instance FLOPs, bytes and times; the share of the step's bound."""
    first = devices[0]
    total = sum(o.bound_s(first) for o in ops)
    head = ("| op | phase | x | GFLOP | MB | FLOP/B | compute us | "
            + " | ".join(f"{d.name} memory us | {d.name} bound us" for d in devices)
            + f" | share of step ({first.name}) |")
    rows = [head, "|" + "---|" * (7 + 2 * len(devices) + 1)]
    for o in ops:
        intensity = f"{o.flops / o.bytes:.0f}" if o.flops else "0"
        cells = [o.name, o.phase, str(o.count), f"{o.flops / 1e9:.2f}", f"{o.bytes / 1e6:.1f}", intensity,
                 f"{o.compute_s(first) / o.count * 1e6:.1f}"]
        for d in devices:
            cells += [f"{o.memory_s(d) / o.count * 1e6:.1f}",
                      f"{o.bound_s(d) / o.count * 1e6:.1f} {'C' if o.bound(d) == 'compute' else 'M'}"]
        cells.append(f"{100 * o.bound_s(first) / total:.1f} %")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summary_table(models=DOC_MODELS, batch: int = DOC_BATCH, devices=DEVICES) -> str:
    """One row per model x op sequence x device: the step's lower bound and what it implies."""
    rows = ["| model | op sequence | TFLOP / step | GB / step | device | lower bound ms / step | img/s | "
            "in memory-bound ops, ms | MFU at the bound |", "|" + "---|" * 9]
    for name in models:
        s = sizes(name, batch)
        for seq, fn in SEQUENCES.items():
            sm = summarize(fn(s), devices)
            for d in devices:
                t = sm.bound_s[d.name]
                rows.append(f"| {name} | {seq} | {sm.flops / 1e12:.2f} | {sm.bytes / 1e9:.1f} | {d.name} | "
                            f"{t * 1e3:.2f} | {batch / t:,.0f} | {sm.memory_bound_s[d.name] * 1e3:.2f} | "
                            f"{sm.flops / t / (d.tflops * 1e12):.1%} |")
    return "\n".join(rows)


def top_memory_bound(ops: list[Op], dev: Device, n: int = 5) -> str:
    """The ``n`` memory-bound ops that take the most of the step's bound on ``dev``, as a markdown list."""
    total = sum(o.bound_s(dev) for o in ops)
    mem = sorted((o for o in ops if o.bound(dev) == "memory"), key=lambda o: -o.bound_s(dev))[:n]
    return "\n".join(f"- {o.name} ({o.phase}, x{o.count}): {o.bound_s(dev) * 1e3:.2f} ms, "
                     f"{100 * o.bound_s(dev) / total:.1f} %" for o in mem)


def model_tables(name: str, batch: int, devices=DEVICES) -> str:
    s = sizes(name, batch)
    parts = []
    for seq, fn in SEQUENCES.items():
        ops = fn(s)
        sm = summarize(ops, devices)
        bounds = ", ".join(f"{d.name} {sm.bound_s[d.name] * 1e3:.2f} ms = {sm.img_per_s(batch, d):,.0f} img/s"
                           for d in devices)
        parts.append(f"### {name}, batch {batch}, {seq} op sequence\n\n"
                     f"{len(ops)} rows; step: {sm.flops / 1e12:.2f} TFLOP, {sm.bytes / 1e9:.1f} GB; lower bound "
                     f"{bounds}.\n\n{op_table(ops, devices)}\n")
    return "\n".join(parts)


def device_table(devices=DEVICES) -> str:
    rows = ["| device | dense bf16 TFLOP/s | HBM TB/s | ridge FLOP/B | source |", "|---|---|---|---|---|"]
    rows += [f"| {d.name} | {d.tflops:g} | {d.tbps:g} | {d.ridge:.0f} | {d.source} |" for d in devices]
    return "\n".join(rows)


COMMAND = "python -m vitkernels.experiments.roofline --doc > docs/roofline.md"


def render_doc() -> str:
    """docs/roofline.md, exactly."""
    s = sizes(DOC_MODELS[0], DOC_BATCH)
    dev0 = DEVICES[0]
    lean, timm = lean_ops(s), timm_ops(s)
    s_flops = summarize(lean).flops / 1e12
    t_flops = s_flops / dev0.tflops * 1e3
    ips = DOC_BATCH / t_flops * 1e3
    top_lean, top_timm = top_memory_bound(lean, dev0), top_memory_bound(timm, dev0)
    dev0 = dev0.name
    return f"""# Roofline lower bound of a ViT training step: a MODEL, not a measurement

{DATE}. Nothing here was run on a GPU: every number is arithmetic on FLOP and byte counts and datasheet peaks.

Regenerate: `{COMMAND}`
(code: `vitkernels/experiments/roofline.py`; `tests/test_roofline.py` fails when this file differs from what
the code prints). One model's tables: `python -m vitkernels.experiments.roofline --model NAME --batch N`.

## What it is

Per op of one training step (forward, cross-entropy, backward, AdamW; batch {DOC_BATCH}, bf16 autocast, fp32
parameters), its FLOPs, the minimum bytes it must move through HBM, and the time each implies at the
datasheet peaks; the op's lower bound is the larger of the two (C: compute bound, M: memory bound), and the
step's lower bound is the sum over its ops (no two ops overlap). An implementation reaches it only if every
kernel runs at 100 % of the binding peak, so real steps are slower; the bound says where time must go, and how
two op sequences compare:

- **lean**: vitkernels' lean blocks (`vitkernels/nn/block.py`: `ln_linear` = norm1 fused into the qkv GEMM,
  attention, proj with the residual in its epilogue, `ln_mlp` = norm2 + fc1 (writes z) and GELU + fc2 +
  residual (reads z)), residual stream bf16.
- **timm**: timm eager's op sequence, every PyTorch op its own kernel (LayerNorm, cast, linear, SDPA flash,
  add, GELU, ...), residual stream fp32 as timm runs under autocast.

Peaks (the dense bf16 figures are `vitkernels.experiments.mfu.PEAK_TFLOPS`; shared/REFERENCES.md uses the
same 989 TFLOP/s for its physical limit; device-to-device copies were measured at 3.0 TB/s on an H100 and 4.3
TB/s on an H200, about 90 % of these):

{device_table()}

## Conventions

- FLOPs: 2 per multiply-add, matrix products only, as `vitkernels.flops.count` (ViT-B/16:
  {sum(s.fwd.values()) / 1e9:.2f} GFLOP forward per image); backward GEMMs = forward GEMMs x 2, attention
  backward = forward x 2. The patch embedding's backward computes only dW (images need no gradient): the step's
  FLOPs are `flops.count(training=True)` minus one patch-embedding forward. LayerNorm, GELU, softmax, adds,
  casts and AdamW count 0 FLOPs.
- Minimum bytes: every tensor an op reads, read once; every tensor it writes, written once (however many
  passes a kernel makes). Work fused into a GEMM (LayerNorm or GELU prologue, bias / residual epilogue, the
  bias gradient taken while dW reads dy) costs only the tensors it adds. fp32 LayerNorm statistics 8 bytes per
  row, attention log-sum-exp 4 bytes per row and head. Each GEMM of a fused op is its own row: ln_mlp's
  backward writes dz and d LN(x) to HBM and reads them back, which `bench --memory`'s traffic proxy (a fused
  op's inputs and outputs, once) does not count.
- Precision: GEMMs read bf16 weights (one fp32 -> bf16 cast per parameter per step: every parameter in the
  lean sequence, whose fused ops cast their LayerNorm parameters too; the GEMMs' in timm's) and write bf16
  weight gradients (cast to the fp32 `.grad`). AdamW (fused, fp32): reads parameter, gradient, both moments
  (16 bytes per parameter), writes parameter and moments (12 bytes): 28 bytes x {s.params() / 1e6:.1f} M
  parameters (ViT-B/16).
- Not modelled: launch latency, tile quantisation (197 tokens), caches, achievable fractions of the peaks,
  data loading, gradient clipping, overlap between ops.

## Step lower bounds

{summary_table()}

MFU at the bound: the step's FLOPs over (its lower bound x peak FLOP/s), the highest MFU this op sequence can
reach. In memory-bound ops: the part of the bound spent in ops below the ridge (where fewer bytes would help;
a compute-bound step would be {s_flops:.2f} TFLOP / 989 TFLOP/s = {t_flops:.2f} ms = {ips:,.0f} img/s for ViT-B/16).

The memory-bound ops that cost the lean sequence most (ViT-B/16, {dev0}):

{top_lean}

and the timm sequence:

{top_timm}

## Per op, ViT-B/16

Per instance: GFLOP, MB (read + written), FLOP/B, and the times in microseconds; x: instances per step (12 per
block op); share: of the step's lower bound on the first device, all instances.

{model_tables(DOC_MODELS[0], DOC_BATCH)}"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitkernels.experiments.roofline", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DOC_MODELS[0], help="a vitkernels.list_models() name")
    p.add_argument("--batch", type=int, default=DOC_BATCH)
    p.add_argument("--doc", action="store_true", help="print docs/roofline.md (ignores --model, --batch)")
    args = p.parse_args(argv)
    if args.doc:
        print(render_doc(), end="")
        return
    print(f"Roofline lower bound (a MODEL, not a measurement)\n\n{device_table()}\n\n"
          f"{summary_table((args.model,), args.batch)}\n\n{model_tables(args.model, args.batch)}", end="")


if __name__ == "__main__":
    main()
