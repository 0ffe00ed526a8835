"""One rank of a launched job (what torchrun runs once per rank, `ldm.run.launch`): train the job's resolved
config; rank 0 writes the metrics next to it, a failing rank its error.

    python -m ldm.run.rank RUN_DIR/launch/config.yaml
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from ldm.run.fit import train


def main(argv=None) -> None:
    (config_path,) = argv if argv is not None else sys.argv[1:]
    config_path = Path(config_path)
    rank = int(os.environ.get("RANK", "0"))
    try:
        metrics = train(OmegaConf.load(config_path))
    except BaseException:
        (config_path.parent / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        raise
    if rank == 0:
        (config_path.parent / "result.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
