"""Hatchling build hook: compile `_kernel.pyx` with OpenMP, or fall back to a pure-Python wheel.

Order of attempts: `-fopenmp` (the real kernel), then without OpenMP (tasks run one after another but
still call BLAS with the GIL released), then nothing (the numpy/torch fallback, one warning at first use).
`LLM_BSM_KERNEL_NO_EXT=1` skips compilation, e.g. to test the fallback wheel. Editable installs compile
in place into `src/llm_bsm_kernel/` (gitignored); regular wheels force-include the built module.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGE_DIR = os.path.join("src", "llm_bsm_kernel")
FLAG_SETS = (["-O3", "-fopenmp"], ["-O3"])


def _cythonize(package_dir: str, tmp: str) -> str:
    """Translate `_kernel.pyx` to C once (in `tmp`); return the path of the C file."""
    from Cython.Build import cythonize
    from setuptools import Extension

    ext = Extension("llm_bsm_kernel._kernel", [os.path.join(package_dir, "_kernel.pyx")])
    (module,) = cythonize([ext], build_dir=tmp, quiet=True, language_level=3)
    return module.sources[0]


def _compile(c_source: str, package_dir: str, out_dir: str, flags: list[str]) -> str:
    """Compile the C file with `flags` into `out_dir`; return the path of the built module."""
    from setuptools import Distribution, Extension

    ext = Extension(
        "llm_bsm_kernel._kernel",
        [c_source],
        include_dirs=[package_dir],
        extra_compile_args=list(flags),
        extra_link_args=[f for f in flags if f == "-fopenmp"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        dist = Distribution({"name": "llm_bsm_kernel", "ext_modules": [ext]})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib = out_dir
        cmd.build_temp = tmp
        cmd.ensure_finalized()
        cmd.run()
        return cmd.get_ext_fullpath("llm_bsm_kernel._kernel")


def _short(exc: Exception) -> str:
    reason = str(exc).splitlines()[0] if str(exc) else ""
    if len(reason) > 120:  # a compiler command line: keep its ends
        reason = f"{reason[:50]} ... {reason[-60:]}"
    return f"{type(exc).__name__}: {reason}"


def build(package_dir: str, out_dir: str) -> tuple[str | None, str]:
    """(path of the built module or None, what happened), trying each flag set in turn."""
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            c_source = _cythonize(package_dir, tmp)
        except Exception as exc:  # noqa: BLE001 - without Cython: the pure wheel
            return None, f"cythonize: {_short(exc)}"
        for flags in FLAG_SETS:
            try:
                built = _compile(c_source, package_dir, out_dir, flags)
            except Exception as exc:  # noqa: BLE001 - no compiler or no OpenMP: next
                errors.append(f"{' '.join(flags)}: {_short(exc)}")
            else:
                return built, f"built with {' '.join(flags)}"
    return None, "; ".join(errors)


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        package_dir = os.path.join(self.root, PACKAGE_DIR)
        editable = version == "editable"
        if editable:  # a stale in-place module would hide the outcome of this build
            for stale in glob.glob(os.path.join(package_dir, "_kernel*.so")):
                os.remove(stale)
        if os.environ.get("LLM_BSM_KERNEL_NO_EXT"):
            message = "llm_bsm_kernel: LLM_BSM_KERNEL_NO_EXT set; pure-Python wheel"
            self.app.display_warning(message)
            return
        self._out_dir = tempfile.mkdtemp(prefix="llm_bsm_kernel_")
        built, what = build(package_dir, self._out_dir)
        if built is None:
            message = f"llm_bsm_kernel: C extension not built ({what}); pure-Python fallback"
            self.app.display_warning(message)
            return
        name = os.path.basename(built)
        if editable:
            shutil.move(built, os.path.join(package_dir, name))
        else:
            build_data["force_include"][built] = f"llm_bsm_kernel/{name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        self.app.display_info(f"llm_bsm_kernel: {name} {what} (Python {sys.version.split()[0]})")

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        if getattr(self, "_out_dir", None):
            shutil.rmtree(self._out_dir, ignore_errors=True)
