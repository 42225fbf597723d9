"""Regenerate the README's gallery, ``figures/``: the one command that writes into the repository.

    python -m depict_analysis.gallery              # from the repository root: figures/ and figures/summary.json
    python -m depict_analysis.gallery --out DIR    # elsewhere, e.g. to compare with the committed gallery

Maintainers run it after changing an analysis, a figure or the built-in models, then commit
``figures/``. It is ``run_demo`` with the default settings; the run records this command, not the
machine's paths, so nothing in the committed files names the machine that made them.
``depict-analyze demo`` writes to a folder of its own (``depict-demo/``) and never here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from depict_analysis.suite import SuiteResult, SuiteSettings, run_demo

COMMAND = "python -m depict_analysis.gallery"


def regenerate(out: str | Path = "figures", device: str = "cpu", progress: bool = True) -> SuiteResult:
    """``run_demo`` into ``out`` with the default settings, recorded as ``COMMAND``."""
    return run_demo(out, device, SuiteSettings(), progress=progress, command=COMMAND)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("figures"), help="the gallery folder (default: figures)")
    parser.add_argument("--device", default="cpu", help="cpu (default: the committed numbers are CPU's) or cuda")
    args = parser.parse_args(argv)
    result = regenerate(args.out, args.device)
    print(f"wrote {args.out}/ in {result.seconds['total']:.0f} s; commit it with the README's numbers checked")


if __name__ == "__main__":
    main()
