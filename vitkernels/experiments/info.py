"""``python -m vitkernels info``: versions, device, and each backend with why it is or is not usable."""

from __future__ import annotations

from vitkernels.experiments.cli import ArgumentParser


def collect() -> dict:
    import torch

    from vitkernels.backends import available_backends, default_backend, triton_interpreter
    from vitkernels.experiments.env import device_name, versions

    info = {
        **versions(("vitkernels", "triton")),
        "triton_interpreter": triton_interpreter(),
        "device": device_name(),
        "default_backend": default_backend(),
        "backends": available_backends(),
        "backends_on_device": available_backends("cuda" if torch.cuda.is_available() else "cpu"),
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
