"""``python -m ddm_hpc.diagnose RUN_DIR``: rewrite ``RUN_DIR/diagnostics.md`` from ``RUN_DIR/diagnose/*.h5``."""
from __future__ import annotations

import sys

from ddm_hpc.diagnose import write_markdown

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ddm_hpc.diagnose RUN_DIR")
    from pathlib import Path

    if not (Path(sys.argv[1]) / "diagnose").is_dir():
        sys.exit(f"error: {sys.argv[1]}/diagnose does not exist: run `ddm-hpc diagnose --out {sys.argv[1]}` first")
    print(write_markdown(sys.argv[1]))
