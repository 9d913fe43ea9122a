"""`synthmed config show`: the resolved configuration of a profile plus overrides."""

from __future__ import annotations

import json

import yaml

from ..config import config_to_dict, configs_dir
from .common import add_config_argument, resolve_config


def register(groups, formatter) -> None:
    parser = groups.add_parser("config", help="show resolved configuration and list profiles", formatter_class=formatter)
    sub = parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)

    show = sub.add_parser("show", help="print the resolved config (profile + overrides)", formatter_class=formatter)
    add_config_argument(show)
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show.set_defaults(handler=_show)

    profiles = sub.add_parser("profiles", help="list the profiles in configs/", formatter_class=formatter)
    profiles.set_defaults(handler=_profiles)


def _show(args, extra) -> int:
    tree = config_to_dict(resolve_config(args, extra))
    print(json.dumps(tree, indent=2) if args.json else yaml.safe_dump(tree, sort_keys=False), end="")
    return 0


def _profiles(args, extra) -> int:
    for path in sorted(configs_dir().glob("*.yaml")):
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{path.stem:10s} {first}")
    return 0
