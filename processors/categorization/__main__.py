"""Command line of the categorizer: `python -m processors.categorization COMMAND ...`.

Commands: `convert` (Fashion-MNIST to the training layout), `demo-events`
(product-listed sample events), `train` (fit artifacts), `evaluate` (score artifacts
on a test CSV). Each takes `--help`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from processors.categorization import fashion_mnist, training


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the command's own parser; exit status 2 for an unknown command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("convert", "demo-events"):
        return fashion_mnist.main(args)
    if args and args[0] in ("train", "evaluate"):
        return training.main(args)
    print(
        "usage: python -m processors.categorization {convert,demo-events,train,evaluate} ...",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
