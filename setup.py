"""Build hook: ship the top-level ``kernels/*.cu`` inside the package as ``gpudeconv/kernels/``.

The CUDA sources stay at the top of the repository (one file per concern, compiled by nvcc in CI),
and a non-editable ``pip install .`` still finds them through
``gpudeconv.backend._kernels.kernel_path``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        source = Path(__file__).parent / "kernels"
        target = Path(self.build_lib) / "gpudeconv" / "kernels"
        target.mkdir(parents=True, exist_ok=True)
        for cu in sorted(source.glob("*.cu")) + sorted(source.glob("*.cuh")):
            self.copy_file(str(cu), str(target / cu.name))


setup(cmdclass={"build_py": BuildPyWithKernels})
