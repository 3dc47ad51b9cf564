"""The ``vlmo-fast`` command.

    vlmo-fast info           what this installation can run (native kernels, CUDA architectures, Triton, device)
    vlmo-fast demo [...]     build a model, save/reload a checkpoint, run every forward path against the official math
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vlmo-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["info", "demo"], help="what to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command (see <command> --help)")
    ns = parser.parse_args(argv[:1])
    rest = argv[1:]
    if ns.command == "info":
        from ._native import build_info

        print(json.dumps(build_info(), indent=2))
        return 0
    from . import demo

    return demo.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
