"""Shared test set-up. Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it is set here when no CUDA device is visible (test.sh sets it too).
"""

import os
import shutil

if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
