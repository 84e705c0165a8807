"""The experiments: what ``python -m vitkernels <command>`` runs, built on the library and never imported by it.

    info      versions, the device, each backend with why it is or is not usable      (info.py)
    train     train a ViT on an offline dataset, 1..N devices, exact resume           (train/, data.py)
    bench     a ViT's training step and inference per provider                        (bench.py)
    sweep     a grid of training runs: accuracy against training compute              (sweep.py)
    plot      the figures of a sweep and of a benchmark                               (plot.py)

Shared by all of them: ``env`` (device name, commit, versions, dtype names), ``cli`` (one-line errors, options
derived from a config dataclass) and ``harness`` (timing providers and modes, one metadata row), which the
per-op scripts in ``benchmarks/`` use too. The library (ops, backends, triton, cuda, nn, models, convert,
patch_timm, flops) imports nothing from here; tests/test_layout.py checks it.
"""
