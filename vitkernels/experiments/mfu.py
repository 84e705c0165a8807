"""Peak throughput of accelerators and model FLOPs utilisation (MFU) for the bench and train commands.

FLOPs themselves are counted by the library (``vitkernels.flops.count``); this table turns achieved FLOP/s
into MFU.
"""

from __future__ import annotations

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets: (substring of torch.cuda.get_device_name,
# {dtype: TFLOP/s}). fp32 is plain FP32 (TF32 off, as the tests and bench run). First match wins, so the
# more specific names come first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM
    ("H800", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("RTX 6000 Ada", {"bf16": 364.0, "fp16": 364.0, "fp32": 91.1}),
    ("RTX A6000", {"bf16": 155.0, "fp16": 155.0, "fp32": 38.7}),
    ("RTX 4090", {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]

_DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
                "half": "fp16", "torch.float16": "fp16", "fp32": "fp32", "float32": "fp32", "none": "fp32",
                "torch.float32": "fp32", "float": "fp32"}


def peak_tflops(device_name: str | None, dtype: str = "bf16") -> float | None:
    """Dense peak TFLOP/s of ``device_name`` (e.g. torch.cuda.get_device_name()) in ``dtype`` (bf16, fp16,
    fp32 or a torch dtype), or None when unknown (or a CPU)."""
    if not device_name:
        return None
    key = _DTYPE_NAMES.get(str(dtype).lower())
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r} for peak_tflops; use bf16, fp16 or fp32")
    for pattern, table in PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            return table.get(key)
    return None


def mfu(flops_per_s: float, device_name: str | None, dtype: str = "bf16", peak: float | None = None
        ) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (``peak`` TFLOP/s overrides the table)."""
    peak = peak if peak is not None else peak_tflops(device_name, dtype)
    return None if not peak else flops_per_s / (peak * 1e12)
