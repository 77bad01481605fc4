"""Build hook: compile every src/bpfnet/bpf/*.bpf.c into src/bpfnet/bpf/build/*.o with clang-16.

Run directly (`python hatch_build.py`) to rebuild the objects in an editable install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

BPF_DIR = Path(__file__).parent / "src" / "bpfnet" / "bpf"
BUILD_DIR = BPF_DIR / "build"
CFLAGS = ["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror", "-Wno-unused-function",
          "-D__TARGET_ARCH_x86", f"-I{BPF_DIR / 'include'}", "-I/usr/include/x86_64-linux-gnu"]


def find_clang() -> str:
    for name in ("clang-16", "clang"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("clang-16 not found: run scripts/setup.sh (apt-get install clang-16)")


def compile_all(force: bool = False) -> list[Path]:
    clang = find_clang()
    BUILD_DIR.mkdir(exist_ok=True)
    headers = list((BPF_DIR / "include").rglob("*.h"))
    built = []
    for source in sorted(BPF_DIR.glob("*.bpf.c")):
        target = BUILD_DIR / (source.name.removesuffix(".bpf.c") + ".o")
        newest = max([source.stat().st_mtime] + [h.stat().st_mtime for h in headers])
        if force or not target.exists() or target.stat().st_mtime < newest:
            subprocess.run([clang, *CFLAGS, "-c", str(source), "-o", str(target)], check=True)
        built.append(target)
    return built


try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface

    class BpfBuildHook(BuildHookInterface):
        PLUGIN_NAME = "custom"

        def initialize(self, version, build_data):
            compile_all()
except ImportError:  # running as a script without hatchling installed
    pass


if __name__ == "__main__":
    for path in compile_all(force="--force" in sys.argv):
        print(path)
