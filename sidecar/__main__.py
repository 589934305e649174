"""The `litefs-sidecar` program (and `python -m sidecar`).

structlog imports rich, colorama and greenlet whenever they are installed, to render tracebacks on a console; no
command uses them, and in a daemon they cost about 7 MiB of RSS (`bench/sidecar_bench.py`). So the program marks
them absent before anything imports structlog. `sidecar.cli.main` itself, which tests call in-process, leaves
`sys.modules` alone.
"""

import sys

UNUSED = ("rich", "colorama", "greenlet")


def main() -> int:
    for name in UNUSED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # Python's documented "not importable"
    from sidecar.cli import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
