"""Model configurations with timm's names, and ``create_model`` / ``list_models``.

The paper's Table 1 gives Base 86M, Large 307M, Huge 632M parameters. timm's counts for the same widths and
depths (which ``create_model`` reproduces exactly) differ slightly because they include the classifier head
and the position embeddings, which depend on the number of classes and the patch grid: vit_base_patch16_224
has 86.6M (1000 classes), vit_large_patch16_224 304.3M, vit_huge_patch14_224 630.8M (timm's default for that
name has no head, num_classes=0). The paper's figures were counted for its own heads and resolutions.
"""

from __future__ import annotations

from vitkernels.nn.vision_transformer import VisionTransformer

# Width (D), depth (L), heads (H) of the paper's Table 1 plus DeiT's Ti and S.
_FAMILIES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}

# name -> (family, patch size, image size, default num_classes as in timm's default pretrained tag)
_NAMES = {
    "vit_tiny_patch16_224": ("tiny", 16, 224, 1000),
    "vit_tiny_patch16_384": ("tiny", 16, 384, 1000),
    "vit_small_patch16_224": ("small", 16, 224, 1000),
    "vit_small_patch16_384": ("small", 16, 384, 1000),
    "vit_small_patch32_224": ("small", 32, 224, 1000),
    "vit_small_patch32_384": ("small", 32, 384, 1000),
    "vit_base_patch8_224": ("base", 8, 224, 1000),
    "vit_base_patch16_224": ("base", 16, 224, 1000),
    "vit_base_patch16_384": ("base", 16, 384, 1000),
    "vit_base_patch32_224": ("base", 32, 224, 1000),
    "vit_base_patch32_384": ("base", 32, 384, 1000),
    "vit_large_patch14_224": ("large", 14, 224, 1000),
    "vit_large_patch16_224": ("large", 16, 224, 1000),
    "vit_large_patch16_384": ("large", 16, 384, 1000),
    "vit_large_patch32_224": ("large", 32, 224, 0),
    "vit_large_patch32_384": ("large", 32, 384, 1000),
    "vit_huge_patch14_224": ("huge", 14, 224, 0),
}


def list_models(pattern: str = "*") -> list[str]:
    """Model names known to ``create_model`` (fnmatch ``pattern``), sorted."""
    import fnmatch

    return sorted(n for n in _NAMES if fnmatch.fnmatch(n, pattern))


def model_config(name: str) -> dict:
    """The constructor arguments ``create_model(name)`` uses (before overrides)."""
    if name not in _NAMES:
        close = [n for n in _NAMES if name.split("_")[0] in n][:5]
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}"
                         + (f" (did you mean one of {close}?)" if close else ""))
    family, patch, img, classes = _NAMES[name]
    return dict(_FAMILIES[family], patch_size=patch, img_size=img, num_classes=classes)


def create_model(name: str, **overrides) -> VisionTransformer:
    """Build ``name`` (timm's names, same parameter count and keys) with constructor overrides, e.g.
    ``create_model("vit_base_patch16_224", num_classes=10, backend="triton")``.

    ``pretrained=True`` is refused: vitkernels downloads nothing; load weights with ``from_timm``,
    ``load_pretrained`` or ``load_npz``.
    """
    if overrides.pop("pretrained", False):
        raise ValueError("vitkernels downloads no weights: build the model, then use vitkernels.from_timm, "
                         "vitkernels.load_pretrained(model, state_dict) or vitkernels.load_npz(model, path)")
    return VisionTransformer(**{**model_config(name), **overrides})
