"""Where a benchmark writes its JSON record and PNG chart.

By default into ``benchmarks/results/local/``, which git ignores, so a run never dirties the
clone; ``--record`` writes into the tracked ``benchmarks/results/`` that benchmarks/README.md
quotes (``make bench RECORD=1``); ``--out DIR`` anywhere else.
"""

import argparse
import pathlib

RECORDED = pathlib.Path(__file__).resolve().parent / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--record",
        action="store_true",
        help="write into the tracked benchmarks/results/ (default: benchmarks/results/local/)",
    )
    parser.add_argument("--out", help="write into this folder instead")


def folder(args: argparse.Namespace) -> pathlib.Path:
    """The folder named by the arguments, created if missing."""
    out = pathlib.Path(args.out) if args.out else RECORDED if args.record else RECORDED / "local"
    out.mkdir(parents=True, exist_ok=True)
    return out
