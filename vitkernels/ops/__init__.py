"""Public functional ops: validate the inputs, then dispatch to a backend.

Every op takes ``backend=`` (``auto | triton | cuda | torch``; None means ``$VITKERNELS_BACKEND`` or
``auto``). Each op lives in ``vitkernels/ops/<op>.py`` with its contract: the schemas every kernel backend
implements, the fake functions, the autograd glue and the FLOP formulas, written once
(``vitkernels/ops/contract.py``). ``vitkernels/ops/reference.py`` is the ``torch`` backend; validation shared
by the ops is in ``vitkernels/ops/validate.py``.
"""

from __future__ import annotations

# Imported here, before any backend imports an op file: the functions, not the modules, are the package's
# attributes of these names.
from vitkernels.backends import OPS
from vitkernels.ops.attention import attention
from vitkernels.ops.attention_qkv import attention_qkv
from vitkernels.ops.glu_linear import glu_linear
from vitkernels.ops.layer_norm import layer_norm
from vitkernels.ops.linear import linear
from vitkernels.ops.ln_glu_mlp import ln_glu_mlp
from vitkernels.ops.ln_linear import ln_linear
from vitkernels.ops.ln_mlp import ln_mlp
from vitkernels.ops.patch_embed import patch_embed
from vitkernels.ops.rope import rope

__all__ = list(OPS)

# torch.fx symbolic tracing (torch.fx.symbolic_trace, timm's / torchvision's create_feature_extractor) records
# each op as one call_function node instead of tracing into its validation and dispatch, which read shapes
# and devices that a Proxy does not have. Modules call the ops as ``ops.<name>``, through these globals.
import torch.fx  # noqa: E402

for _name in OPS:
    torch.fx.wrap(_name)
del _name
