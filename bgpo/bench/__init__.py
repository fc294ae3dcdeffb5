"""Benchmarks: ``python -m bgpo.bench <name> [args]`` runs ``bgpo.bench.<name>.main(argv)``.

- ``rollout``: tokens/s, forward passes (NFE) and accuracy of the rollout sampler's modes.
"""
