"""Builds flashseek._C with CMake + Ninja.

The extension always holds the op schemas (TORCH_LIBRARY). The CUDA kernels for sm_90a are added
when a CUDA toolkit is found and FLASHSEEK_CUDA is not 0; otherwise every op runs its pure-torch
reference and the build says so.

Environment knobs:
  FLASHSEEK_CUDA=0|1   force the CPU-only build (0) or fail if CUDA is missing (1); default: auto
  CUDA_HOME            the toolkit root (default: /usr/local/cuda, else derived from nvcc on PATH)
  MAX_JOBS             parallel compile jobs (default: all cores)
  FLASHSEEK_KERNELS_LIB  link this prebuilt libflashseek_kernels.a (scripts/build_kernels.sh) instead
                       of compiling the kernels: they hold no torch code, so one build serves any torch
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").exists():
            return Path(os.environ[var])
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        # A wrapper script on PATH is common; the toolkit holds include/cuda_runtime.h.
        home = Path(nvcc).resolve().parent.parent
        if (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def _want_cuda():
    flag = os.environ.get("FLASHSEEK_CUDA", "auto").lower()
    cuda_home = _find_cuda_home()
    if flag in ("0", "off", "false", "no"):
        return None, "FLASHSEEK_CUDA=0"
    if cuda_home is None:
        if flag in ("1", "on", "true", "yes"):
            sys.exit("flashseek: FLASHSEEK_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return None, "no CUDA toolkit (nvcc) found"
    return cuda_home, None


def _cutlass_include_dirs():
    import cutlass_library

    src = Path(cutlass_library.__file__).resolve().parent / "source"
    return [src / "include", src / "tools" / "util" / "include"]


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch
        from torch.utils import cpp_extension

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A stable build directory under the checkout (not pip's random temp dir): ninja then rebuilds
        # only what changed, and ccache (rooted at the checkout) can reuse objects across clones.
        build_dir = Path(os.environ.get("FLASHSEEK_BUILD_DIR") or ROOT / "build" / "cmake").resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda_home, why_not = _want_cuda()
        if cuda_home is None:
            print(f"flashseek: building WITHOUT CUDA kernels ({why_not}); "
                  "every op will run its pure-torch reference.", flush=True)

        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFLASHSEEK_OUTPUT={out_path}",
            f"-DFLASHSEEK_TORCH_INCLUDES={';'.join(cpp_extension.include_paths())}",
            f"-DFLASHSEEK_TORCH_LIBDIR={Path(torch.__file__).parent / 'lib'}",
            f"-DFLASHSEEK_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DFLASHSEEK_PY_INCLUDE={_python_include()}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-G", "Ninja",
        ]
        if cuda_home is not None:
            args += [
                "-DFLASHSEEK_CUDA=ON",
                f"-DCUDAToolkit_ROOT={cuda_home}",
                f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
                f"-DFLASHSEEK_CUTLASS_INCLUDES={';'.join(str(p) for p in _cutlass_include_dirs())}",
                # Headers that the cu13 torch wheel carries (curand etc.) but a minimal toolkit lacks.
                f"-DFLASHSEEK_NV_WHEEL_INCLUDE={_nvidia_wheel_include()}",
            ]
            # Always passed (empty = compile the kernels): the build directory's cache outlives one build.
            kernels_lib = os.environ.get("FLASHSEEK_KERNELS_LIB")
            args.append(f"-DFLASHSEEK_KERNELS_LIB={Path(kernels_lib).resolve() if kernels_lib else ''}")
        else:
            args += ["-DFLASHSEEK_CUDA=OFF"]
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        # Prefer the cmake/ninja installed beside this Python (pip's), which a venv that is not
        # activated leaves off PATH, over an older system cmake.
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("CCACHE_BASEDIR", str(ROOT))
        subprocess.check_call(["cmake", str(ROOT), *args], cwd=build_dir, env=env)
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, env=env)
        if not out_path.exists():
            sys.exit(f"flashseek: CMake did not produce {out_path}")


def _python_include():
    import sysconfig

    return sysconfig.get_paths()["include"]


def _nvidia_wheel_include():
    try:
        import nvidia

        for base in nvidia.__path__:
            inc = Path(base) / "cu13" / "include"
            if inc.exists():
                return str(inc)
    except ImportError:
        pass
    return ""


setup(
    ext_modules=[CMakeExtension("flashseek._C")],
    cmdclass={"build_ext": CMakeBuild},
    package_dir={"": "python"},
)
