"""Start 2 gloo ranks of a test module the way users start them (``hawq.ui.launch``, i.e.
``torchrun``), 1 thread each, and read what every rank wrote to ``rank<r>.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def launch_ranks(tmp_path: Path, mode: str, module: str) -> tuple[int, list[dict]]:
    """Run ``python -m <module> <tmp_path> <mode>`` as 2 ranks; returns torchrun's exit status
    and the JSON each rank wrote (ranks that wrote nothing are left out)."""
    from hawq.ui.launch import maybe_relaunch

    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        rc = maybe_relaunch(2, [str(tmp_path), mode], module=module)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())
             for r in range(2) if (tmp_path / f"rank{r}.json").exists()]
    return rc, ranks
