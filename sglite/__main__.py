"""`python -m sglite serve [flags]` (also the `sglite` console script): run the runtime in the foreground."""

from __future__ import annotations

import sys

USAGE = "usage: sglite serve [--model PATH] [flags]   (sglite serve --help lists the flags)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "serve":
        print(f"sglite: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    from sglite.runtime.server.args import parse_args

    args = parse_args(argv[1:])
    from sglite.runtime.server.zmq_server import serve  # imports torch: after argument errors are reported

    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
