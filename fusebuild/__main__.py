"""`fusebuild` and `python -m fusebuild`: the command line, or which extra it needs."""
from __future__ import annotations

import sys

from .errors import MissingExtra


def main() -> None:
    try:
        from .cli import main as cli
    except ModuleNotFoundError as e:
        if e.name != "click":
            raise
        print(f"fusebuild: {MissingExtra('click')}", file=sys.stderr)
        sys.exit(MissingExtra.exit_code)
    cli(prog_name="fusebuild")


if __name__ == "__main__":
    main()
