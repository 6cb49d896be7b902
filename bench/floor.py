"""The bare framer loop beside the engine: what fanout's features cost.

A thin wrapper over bench/throughput.py: its ``floor`` worker drives one
``fanout._engine.connection.Connection`` per socket with a fixed request and nothing around it
(no outcomes, limiter, retries, metrics); its ``fanout`` worker is the full engine. The two
run interleaved, pinned like every other benchmark, and engine/floor CPU per push (median
of per-round paired ratios) is checked against the target <= 1.5. Results go to
bench/results/floor.json and .md (throughput.py, which also runs aioapns, writes
throughput.*).

    python bench/floor.py              # 3 rounds x 20,000 pushes
    python bench/floor.py --quick      # 2 rounds x 10,000
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.exit(subprocess.call([sys.executable, str(here / "throughput.py"), "--clients",
                              "fanout,floor", "--name", "floor", *sys.argv[1:]]))
