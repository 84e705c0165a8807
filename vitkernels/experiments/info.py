"""``python -m vitkernels info``: versions, device, and each backend with why it is or is not usable."""

from __future__ import annotations

import argparse
import platform

from vitkernels.cli import ArgumentParser


def collect() -> dict:
    import torch

    import vitkernels
    from vitkernels.backends import available_backends, default_backend, triton_interpreter

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001
        triton_version = f"not importable ({type(exc).__name__})"
    cuda = torch.cuda.is_available()
    info = {
        "vitkernels": vitkernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpreter": triton_interpreter(),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "default_backend": default_backend(),
        "backends": available_backends(),
        "backends_on_device": available_backends("cuda" if cuda else "cpu"),
    }
    try:
        from vitkernels.cuda import extension_info

        info["extension"] = extension_info()
    except ImportError:
        pass
    return info


def main(argv=None) -> int:
    parser = ArgumentParser(prog="vitkernels info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2, default=str))
        return 0
    for key, value in info.items():
        if key.startswith("backends"):
            where = "" if key == "backends" else " (for tensors on this machine's device)"
            print(f"{key}{where}:")
            for name, why in value.items():
                print(f"  {name:7s} {'usable' if why is None else 'unusable: ' + why}")
        elif isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0
