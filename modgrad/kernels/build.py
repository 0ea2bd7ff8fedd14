"""Build the Mojo kernel package once per source version and cache it on disk.

The package is ``mojo precompile``d into ``~/.cache/modgrad/kernels/<hash>/mojo_kernels.mojoc``
(``MODGRAD_CACHE_DIR`` moves the root), where the hash covers every ``.mojo`` source and the
``mojo`` version, so an edit or an upgrade rebuilds and anything else reuses the file. The
``mojo`` CLI and MAX's graph compiler prune each other's kernel objects when they share a
``MODULAR_CACHE_DIR``, so the build runs with its own cache directory under the same root.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE_NAME = "mojo_kernels"


@dataclass(frozen=True)
class KernelBuild:
    """A built kernel package: its path, the source hash it was built from and the build cost."""

    path: Path  # the .mojoc file to pass to Graph(custom_extensions=[...])
    source_hash: str
    seconds: float  # time spent in this call: the mojo build, or ~0 on a cache hit
    cached: bool  # True when an earlier build was reused


def cache_root() -> Path:
    """Return the directory that contains built kernel packages."""
    override = os.environ.get("MODGRAD_CACHE_DIR")
    base = Path(override) if override else Path.home() / ".cache" / "modgrad"
    return base / "kernels"


def kernel_source_dir() -> Path:
    """Find the ``mojo_kernels`` source folder: ``MODGRAD_MOJO_KERNELS``, the repo, or the wheel."""
    override = os.environ.get("MODGRAD_MOJO_KERNELS")
    candidates = [Path(override)] if override else []
    this_file = Path(__file__).resolve()
    candidates += [
        this_file.parents[2] / PACKAGE_NAME,  # source checkout: <repo>/modgrad/kernels/build.py
        this_file.parents[1] / PACKAGE_NAME,  # installed wheel: modgrad/mojo_kernels
    ]
    for candidate in candidates:
        if (candidate / "__init__.mojo").is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Mojo kernel sources not found (searched {searched}); "
        "set MODGRAD_MOJO_KERNELS to the mojo_kernels folder"
    )


def mojo_executable() -> str:
    """Return the ``mojo`` CLI of this Python environment, else the one on PATH."""
    beside_python = Path(sys.executable).parent / "mojo"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("mojo")
    if found is None:
        raise FileNotFoundError(
            "the mojo CLI was not found beside the Python interpreter or on PATH; "
            "install it with `pip install mojo`"
        )
    return found


def _mojo_version(mojo: str) -> str:
    result = subprocess.run([mojo, "--version"], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def source_hash(source_dir: Path, mojo: str) -> str:
    """Hash the ``.mojo`` sources (names and bytes) together with the mojo version."""
    digest = hashlib.sha256(_mojo_version(mojo).encode())
    for path in sorted(source_dir.rglob("*.mojo")):
        digest.update(str(path.relative_to(source_dir)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_kernels(
    source_dir: Path | None = None,
    *,
    root: Path | None = None,
    force: bool = False,
) -> KernelBuild:
    """Precompile the kernel package unless a build of the same sources is cached.

    Concurrent callers may both build; each writes a private temporary file and renames it into
    place, so readers only ever see a complete package.
    """
    source_dir = source_dir or kernel_source_dir()
    root = root or cache_root()
    mojo = mojo_executable()
    start = time.perf_counter()
    key = source_hash(source_dir, mojo)
    target = root / key / f"{PACKAGE_NAME}.mojoc"
    if target.is_file() and not force:
        seconds = time.perf_counter() - start
        logger.debug("kernel package %s reused (%.3f s)", target, seconds)
        return KernelBuild(target, key, seconds, cached=True)

    target.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MODULAR_CACHE_DIR=str(root / "mojo-cache"))
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        # Build from a copy, so the package matches the hashed sources even if they are
        # edited during the build. mojo names the package after the folder it precompiles.
        staged_source = Path(scratch) / PACKAGE_NAME
        shutil.copytree(source_dir, staged_source)
        staged_output = Path(scratch) / f"{PACKAGE_NAME}.mojoc"
        command = [mojo, "precompile", str(staged_source), "-o", str(staged_output)]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(
                f"mojo precompile of {source_dir} failed with exit code {result.returncode}:\n"
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        os.replace(staged_output, target)
    seconds = time.perf_counter() - start
    logger.info("built kernel package %s in %.2f s", target, seconds)
    return KernelBuild(target, key, seconds, cached=False)
