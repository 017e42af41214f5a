"""Do two sets of per-seed figures differ? An exact permutation test and a bootstrap interval.

    python examples/seed_stats.py A.json B.json    # two lists of per-seed figures, or {"values": [...]}

prints the difference of means, its bootstrap interval and the permutation p-value
(:mod:`training.stats`).
"""

from __future__ import annotations

import argparse

from training.cli import path_argument, positive_number
from training.stats import describe, read_values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=path_argument("file"))
    parser.add_argument("b", type=path_argument("file"))
    parser.add_argument("--scale", type=positive_number(), default=100.0, help="multiplies the figures (default: %(default)s, fractions to points)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        a, b = read_values(args.a), read_values(args.b)
    except ValueError as err:
        raise SystemExit(f"seed_stats: {err}") from None
    print(describe(a, b, scale=args.scale))


if __name__ == "__main__":
    main()
