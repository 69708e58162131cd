"""Join the process group, leave it (Dist.close), and join again in the same process, as two runs from the
Python API would; rank 0 records what each pass saw. Used by test_distributed.py."""
from __future__ import annotations

import json
import sys

import torch

from lite_ft.training import distributed


def main(out: str) -> None:
    seen = []
    for _ in range(2):
        dist = distributed.start("cpu")
        total = dist.sum(dist.rank + 1)
        dist.close()
        seen.append({"world": dist.world, "sum": total, "left": not torch.distributed.is_initialized()})
    if dist.is_main:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(seen, f)


if __name__ == "__main__":
    main(sys.argv[1])
