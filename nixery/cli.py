"""The command line: the only place that parses argv and may exit."""

from __future__ import annotations

import argparse
import sys

from nixery import __version__


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from nixery import config, logs
    from nixery.app import create_app

    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"nixery: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None, access_log=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["layers", "plan"]:
        from nixery.layers.plan_cli import main as plan_main

        return plan_main(argv[2:])
    parser = argparse.ArgumentParser(prog="nixery", description="A container registry that builds images with Nix.")
    parser.add_argument("--version", action="version", version=f"nixery {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the registry (settings from the environment)")
    layers = commands.add_parser("layers", help="layering tools")
    layers.add_argument("action", choices=["plan"], help="plan: run the layering on a graph and image list")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
