"""Build and install owlore-kernels.

The C++ CPU kernels in ``csrc/`` are built as a torch extension
(``owlore_kernels._C``) with OpenMP. If they cannot be built (no compiler, no
torch at build time), the package still installs and falls back to the
pure-PyTorch reference ops, unless OWLORE_REQUIRE_EXT=1, which turns a failed
build into an error (CI sets it so that the extension is really tested).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

REQUIRE_EXT = os.environ.get("OWLORE_REQUIRE_EXT") == "1"
ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # torch is not importable in this build environment
    if REQUIRE_EXT:
        raise
    BuildExtension = None
    print("owlore-kernels: torch not importable at build time; skipping the C++ extension", file=sys.stderr)

if BuildExtension is not None and sources:
    ext_modules.append(
        CppExtension(
            "owlore_kernels._C",
            sources,
            # -g0: no debug info (Python's default CFLAGS add -g), a 7.5 MB .so and a
            # slower compile otherwise. -fopenmp links libgomp.so.1, the soname of the
            # libgomp torch ships, so at run time there is one OpenMP runtime, torch's.
            extra_compile_args=["-O3", "-fopenmp", "-g0", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
        )
    )

    class OptionalBuildExtension(BuildExtension):
        """Build the extension, but let the install go on without it unless it is required."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing or compile error
                if REQUIRE_EXT:
                    raise
                print(f"owlore-kernels: C++ extension not built ({exc}); using the torch reference ops",
                      file=sys.stderr)

    cmdclass["build_ext"] = OptionalBuildExtension

setup(
    name="owlore-kernels",
    version="0.1.0",
    description="OwLore fine-tuning: outlier-weighted layer sampling + GaLore projection, with fused kernels",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["owlore_kernels", "owlore_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.3", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "hf": ["transformers>=4.40"],
        # the benchmark harness builds on pytest-benchmark (statistics, machine info, saved runs)
        "bench": ["transformers>=4.40", "peft", "galore-torch==1.0", "bitsandbytes", "gguf", "matplotlib", "tqdm",
                  "pytest-benchmark"],
        "test": ["pytest", "pytest-benchmark", "transformers>=4.40", "galore-torch==1.0", "bitsandbytes", "peft"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["owlore-kernels=owlore_kernels.__main__:main"]},
)
