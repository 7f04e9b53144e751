"""`make bench`: every benchmark script in this folder, one after another, sharing one work folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_engine.py", "bench_methods.py", "bench_lora.py", "bench_flux.py", "bench_forensics.py", "bench_scaling.py"]


def main() -> int:
    work = HERE / "work"
    extra = sys.argv[1:]
    for name in SCRIPTS:
        script = HERE / name
        if not script.exists():
            continue
        print(f"== {name}", flush=True)
        code = subprocess.call([sys.executable, str(script), "--workdir", str(work), *extra])
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
