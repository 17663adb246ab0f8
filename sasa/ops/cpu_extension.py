"""The C++ CPU kernels (local and blocked attention), compiled once per machine on first use and cached.

``torch.utils.cpp_extension.load`` builds the kernels in ``csrc/`` with the machine's
compiler into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and rebuilds only
when the source, the flags or torch change; concurrent first uses (DDP ranks, Ray trials) wait on
its lock. ``make install`` builds it ahead of time (``python -m sasa build-ext``). Where no
compiler is available the ops fall back to their PyTorch kernels with one warning, and
``SASA_CPU_EXTENSION=0`` turns the extension off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "local_attention_cpu.cpp", CSRC / "blocked_attention_cpu.cpp", CSRC / "footprint_aggregate_cpu.cpp"]
CFLAGS = ["-O3", "-march=native"]
# ATen's parallel_for is an OpenMP pragma in a header: without -fopenmp the kernel runs on one thread
OPENMP = ["-fopenmp"] if platform.system() == "Linux" else []


def _name():
    """-march=native code must not be loaded on another CPU model (a shared home directory on a
    cluster): the build folder is keyed by the machine and the CPU's description. It is keyed by
    the sources and headers too, because torch's rebuild check does not look at included headers,
    and by the torch installation, whose paths the build file names: two environments sharing one
    folder would rebuild it in turn."""
    cpu = platform.machine() + platform.processor() + "".join(p.read_text() for p in sorted(CSRC.iterdir()))
    cpu += str(Path(torch.__file__).resolve().parent)
    try:
        cpu += next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return "sasa_local_attention_cpu_" + hashlib.sha1(cpu.encode()).hexdigest()[:10]


def _staged_sources(folder: Path) -> list[str]:
    """The sources as copied to ``folder``, named by their content (``_name``). torch rebuilds an
    extension whose source paths change, so every copy of the project (each node's checkout, each
    test's project folder) would rebuild it, and the next process from another copy again; built from
    one staged copy, they all share one build."""
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}."))
        shutil.copytree(CSRC, tmp, dirs_exist_ok=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process staged it first: same content
            shutil.rmtree(tmp, ignore_errors=True)
    return [str(folder / p.name) for p in SOURCES]


@functools.cache
def load():
    """The ``torch.ops.sasa_cpu`` namespace, or None when the extension is off or cannot be built."""
    if os.environ.get("SASA_CPU_EXTENSION", "1") == "0":
        return None
    try:
        # importing it looks for a CUDA toolkit and warns on CPU-only machines; we build CPU code only
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import get_default_build_root
        from torch.utils.cpp_extension import load as build_and_load

        name = _name()
        sources = _staged_sources(
            Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / f"{name}_src"
        )
        build_and_load(
            name=name,
            sources=sources,
            extra_cflags=CFLAGS + OPENMP,
            extra_ldflags=OPENMP,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a broken toolchain: the PyTorch kernel still works
        warnings.warn(
            "sasa: the C++ CPU kernel could not be built, using the slower PyTorch kernel "
            f"({type(exc).__name__}: {exc})",
            stacklevel=2,
        )
        return None
    return torch.ops.sasa_cpu
