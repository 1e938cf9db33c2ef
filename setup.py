"""Builds the C++ CPU kernels (src/bitfold/kernels/cpu/*.cpp) as bitfold._lut at install.

Optional on purpose: without a C++ compiler the install still succeeds, and bitfold compiles
the kernel on first use if a compiler appears later (else low-bit layers fall back to a slow
dequantize-and-matmul path and say so). Everything else about the package is in pyproject.toml.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any compiler failure must not fail the install
            print(f"warning: building {ext.name} failed ({e}); bitfold will try again at first use")


setup(
    ext_modules=[Extension(
        "bitfold._lut",
        sources=["src/bitfold/kernels/cpu/lut_gemm.cpp", "src/bitfold/kernels/cpu/decode_ops.cpp",
                 "src/bitfold/kernels/cpu/decode_step.cpp", "src/bitfold/kernels/cpu/quant_kv.cpp",
                 "src/bitfold/kernels/cpu/quant_kv_write.cpp"],
        # Portable build: the kernel picks AVX-512 / AVX2 / scalar per function at run time.
        extra_compile_args=["-O3", "-std=c++17", "-Wno-maybe-uninitialized"],
        language="c++",
    )],
    cmdclass={"build_ext": OptionalBuildExt},
)
