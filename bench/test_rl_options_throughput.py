"""What each restoration option costs per iteration, next to plain gpudeconv RL and skimage in
the same run (pytest-benchmark; ``pytest bench/test_rl_options_throughput.py``).

One group per backend and size: plain RL, the noise-aware data term, TV regularization, damped
RL, Biggs-Andrews acceleration (which needs about half the iterations for the same fit: its
per-iteration figure is what it costs, not what it saves) and deringing, all at the same
iterations, so the MPix·it/s figures compare directly.
"""

from __future__ import annotations

import pytest
from test_rl_throughput import CASES, _backend, _implementation, time_restoration

import gpudeconv as gd

#: case id -> richardson_lucy options
OPTIONS = {
    "plain": {},
    "noise": {"noise": "auto"},
    "rl-tv": {"noise": "auto", "regularization": 0.005},
    "damped": {"noise": "auto", "damping": 3.0},
    "accelerate": {"noise": "auto", "accelerate": True},
    "dering": {"noise": "auto", "dering": 1.0},
}


@pytest.mark.parametrize("backend_name", ["numpy", "cupy"])
@pytest.mark.parametrize("case", [*OPTIONS, "skimage"])
def test_option_cost(benchmark, case, backend_name, settings, field):
    backend = _backend(backend_name)
    size = settings["size"] if backend_name == "numpy" else settings["gpu_size"]
    if case == "skimage":
        if backend_name != "numpy":
            pytest.skip("skimage runs on the CPU only")
        function = _implementation(*CASES["skimage"])
    else:
        options = OPTIONS[case]

        def function(image, psf, iterations):
            return gd.richardson_lucy(image, psf, iterations, backend=backend, **options)

    benchmark.group = f"RL options {size}x{size}, {settings['iterations']} it, {backend_name}"
    time_restoration(benchmark, function, backend, size, settings, field, option=case)
