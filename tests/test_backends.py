"""Backend names, availability with reasons, dispatch and its errors, and the ops' input validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vitkernels
from vitkernels import backends, ops
from vitkernels.backends import BackendError


def test_available_backends_reports_each_with_reason():
    avail = vitkernels.available_backends()
    assert set(avail) == {"triton", "cuda", "torch"}
    assert avail["torch"] is None
    for name, why in avail.items():
        assert why is None or (isinstance(why, str) and why), name


def test_auto_on_cpu_is_torch():
    name, fn = backends.resolve("linear", "auto", torch.device("cpu"))
    assert name == "torch" and fn is backends.get_impl("torch").get_op("linear")


def test_env_default(monkeypatch):
    monkeypatch.setenv("VITKERNELS_BACKEND", "torch")
    assert backends.default_backend() == "torch"
    monkeypatch.setenv("VITKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        backends.default_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'; choose one of auto, triton, cuda, torch"):
        ops.layer_norm(torch.randn(2, 4), None, None, backend="cudnn")


def test_explicit_unavailable_backend_lists_all_reasons(monkeypatch):
    monkeypatch.setattr(backends, "_RESOLVED", {})  # resolve afresh, and restore the cache afterwards
    monkeypatch.setitem(backends._PROBED, "cuda", (None, "the compiled extension is missing (test)"))
    monkeypatch.setitem(backends._PROBED, "triton", (None, "triton is not importable (test)"))
    with pytest.raises(BackendError) as err:
        ops.linear(torch.randn(2, 4), torch.randn(3, 4), backend="cuda")
    msg = str(err.value)
    assert "backend 'cuda' cannot run linear on cpu tensors" in msg
    assert "triton: triton is not importable (test)" in msg and "torch: ok" in msg
    # auto falls back to torch without complaint
    assert ops.linear(torch.randn(2, 4), torch.randn(3, 4), backend="auto").shape == (2, 3)


def test_triton_refuses_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setattr(backends, "_PROBED", {})  # probe afresh, and restore the cache afterwards
    monkeypatch.setattr(backends, "_RESOLVED", {})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = backends.why_not("triton", "cpu")
    assert why is not None and "TRITON_INTERPRET=1" in why


LN_CASES = [
    (dict(x=torch.randn(2, 8), weight=torch.randn(7), bias=None), r"weight must be \(8,\)"),
    (dict(x=torch.randn(2, 8), weight=None, bias=None, residual=torch.randn(2, 7)), "residual shape"),
    (dict(x=torch.randn(2, 8), weight=torch.randn(8, dtype=torch.float64), bias=None), "dtype"),
    (dict(x=torch.randint(0, 3, (2, 8)), weight=None, bias=None), "floating-point"),
]


@pytest.mark.parametrize("kwargs,match", LN_CASES)
def test_layer_norm_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.layer_norm(**kwargs)


def test_linear_validation():
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match="x has 8 features but weight expects 6"):
        ops.linear(x, torch.randn(3, 6))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.linear(x, torch.randn(3, 8), activation="relu")
    with pytest.raises(ValueError, match=r"residual must be \(5, 3\)"):
        ops.linear(x, torch.randn(3, 8), residual=torch.randn(5, 8))


def test_attention_validation():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"must be \(B, H, N, D\)"):
        ops.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="disagree on B, H or D"):
        ops.attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    out = ops.attention(q, torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8))  # cross-length is fine
    assert out.shape == (1, 2, 5, 8)


def test_patch_embed_validation():
    img = torch.randn(2, 3, 16, 24)
    w = torch.randn(10, 3, 8, 8)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        ops.patch_embed(torch.randn(2, 3, 20, 24), w, None)
    with pytest.raises(ValueError, match="images have 3 channels but weight expects 1"):
        ops.patch_embed(img, torch.randn(10, 1, 8, 8), None)
    with pytest.raises(ValueError, match=r"pos_embed must be \(1, T, 10\) with T in \[6, 7\]"):
        ops.patch_embed(img, w, None, pos_embed=torch.randn(1, 5, 10), cls_token=torch.randn(1, 1, 10))
    out = ops.patch_embed(img, w, torch.randn(10), pos_embed=torch.randn(1, 7, 10), cls_token=torch.randn(1, 1, 10))
    assert out.shape == (2, 7, 10)


def test_autotuning_results_persist_on_disk(monkeypatch):
    """Every autotuned Triton kernel goes through vitkernels.triton.autotune, which asks Triton to keep the
    winner on disk (cache_results; Triton itself turns that off under its interpreter)."""
    triton = pytest.importorskip("triton")
    import vitkernels.triton as vt

    seen = {}
    monkeypatch.setattr(triton, "autotune", lambda **kw: seen.update(kw) or (lambda fn: fn))
    vt.autotune([], ["N"])
    assert seen["cache_results"] is vt.AUTOTUNE_CACHE is True
    root = Path(vt.__file__).parent
    direct = [p.name for p in root.glob("*.py") if p.name != "__init__.py" and "triton.autotune(" in p.read_text()]
    assert not direct, f"these call triton.autotune directly (no disk cache): {direct}"
