"""What the kill-and-resume tests share: a search slow enough per trial to be killed mid-trial,
run in a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

# one epoch of distilled fine-tuning per trial: seconds, so a kill lands mid-trial
SLOW_SPACE = {
    "prune_macs": [0.5, 0.75],
    "prune_allocation": ["uniform"],
    "lowrank_energy": [0.0],
    "recovery_epochs": [1],
    "quant": ["fp32", "int8"],
}
CODE = """
import sys, torch
torch.set_num_threads({threads})
from slimkit.search import compress
storage = sys.argv[2] if len(sys.argv) > 2 else None
compress("zoo:digits_cnn", {{"size_mb": 0.05}}, out=sys.argv[1], storage=storage,
         worker=sys.argv[3:] == ["worker"], **{args})
"""


def start(args: dict[str, Any], *argv: str, threads: int = 2) -> subprocess.Popen[bytes]:
    """``compress`` on the digits CNN in a new process: ``argv`` = out [storage [worker]]."""
    code = CODE.format(threads=threads, args=repr(args))
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
