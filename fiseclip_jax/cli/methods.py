"""`fiseclip-jax methods [NAME]`: every field of each method config, its type, default and meaning."""

from __future__ import annotations

from .. import methods, overrides


def cmd_methods(args) -> int:
    print(overrides.describe(args.name), end="")
    return 0


def add_parser(sub) -> None:
    m = sub.add_parser("methods", help="list the methods and every field --set/--config can change "
                       "(type, default, meaning; [enc]: changes the encoding)")
    m.add_argument("name", nargs="?", choices=methods.names(), default=None, help="one method (default: all)")
    m.set_defaults(func=cmd_methods)
