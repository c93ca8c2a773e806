"""`python -m fusebuild.c_runtime --include | --lib | --cflags | --libs`: where the C runtime's
header and library are, as paths or compiler flags (one line, in the order asked)."""
from __future__ import annotations

import argparse
import sys

from . import cflags, include_dir, libs, library_path

_PRINTS = {"include": include_dir, "lib": library_path, "cflags": cflags, "libs": libs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusebuild.c_runtime",
                                     description="Where fusebuild's C runtime is.")
    parser.add_argument("--include", dest="asked", action="append_const", const="include",
                        help="the folder of fusebuild.h")
    parser.add_argument("--lib", dest="asked", action="append_const", const="lib",
                        help="the path of libfusebuild_rt.so")
    parser.add_argument("--cflags", dest="asked", action="append_const", const="cflags",
                        help="compiler flags (-I...)")
    parser.add_argument("--libs", dest="asked", action="append_const", const="libs",
                        help="linker flags (-L... -lfusebuild_rt -Wl,-rpath,...)")
    asked = parser.parse_args(argv).asked
    if not asked:
        parser.error("say what to print: --include, --lib, --cflags or --libs")
    try:
        print(" ".join(_PRINTS[what]() for what in asked))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
