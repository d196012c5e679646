"""`python -m kubelora.devenv up|down|status|build`: the local environment, without the venv's extras."""

from __future__ import annotations

import argparse
import sys
import time

from kubelora.devenv import cluster, tools


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubelora.devenv", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "build"])
    args = parser.parse_args(argv)
    if args.command == "build":
        started = time.monotonic()
        for name, path in tools.build_all().items():
            print(f"{name}\t{path}")
        print(f"Tools ready seconds={time.monotonic() - started:.1f}", file=sys.stderr)
        return 0
    if args.command == "down":
        cluster.down()
        return 0
    if args.command == "status":
        env = cluster.load()
        if env is None:
            print("The environment is not running; start it with: make dev-up", file=sys.stderr)
            return 1
        print(cluster.describe(env))
        return 0
    started = time.monotonic()
    env = cluster.up()
    print(cluster.describe(env))
    print(f"Ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
