"""timm's model API around the forward, shared by vitkernels' ports of timm's Eva and Beit (VisionTransformer
has its own, richer versions): the classifier, gradient checkpointing and the backend of every op."""

from __future__ import annotations

from torch import nn

from vitkernels.backends import check_name, prepare


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Run every op of ``model`` on ``backend`` from now on (every submodule with a ``backend`` attribute)."""
    backend = check_name(backend)
    prepare(backend)
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model


def zero_head(model: nn.Module, num_classes: int) -> nn.Module:
    """A new (embed_dim x num_classes) head with weight and bias all zero, the paper's fine-tuning head (section
    3.2: predictions start uniform); nn.Identity for num_classes 0. On the model's device and dtype."""
    if num_classes <= 0:
        return nn.Identity()
    w = next(model.parameters())
    head = nn.Linear(model.embed_dim, num_classes, device=w.device, dtype=w.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class ClassifierApi:
    """``get_classifier``, ``reset_classifier`` (a zero-initialised head, as VisionTransformer's; pooling
    checked against the class's ``POOLS``), ``set_grad_checkpointing`` and ``set_backend`` for a model with
    timm's ``head``, ``embed_dim``, ``num_classes``, ``global_pool`` and ``grad_checkpointing`` attributes."""

    POOLS: tuple = ("", "avg", "token")

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in self.POOLS:
                raise ValueError(f"global_pool must be one of {self.POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = zero_head(self, num_classes)
        self.head.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_backend(self, backend: str):
        """Run every op of the model on ``backend`` from now on."""
        return set_backend(self, backend)
