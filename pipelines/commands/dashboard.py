"""`synthmed dashboard`: the local web app (Generate, Traces, Runs, Data, Rate, Enhance) on Gradio."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

from generator.errors import UserError

from ..config import parse_overrides
from .common import add_config_argument, resolve_config

INSTALL_HINT = 'the dashboard needs the optional extra: pip install -e ".[dashboard]" (gradio 6)'


def register(groups, formatter) -> None:
    p = groups.add_parser(
        "dashboard", formatter_class=formatter,
        help="the local web app: generate, traces, runs and reward logs, data, rating, enhancement",
        description="A Gradio app on this machine over the same data functions the CLI uses (pipelines.dashboard.data). "
                    "It serves files only from the run and data folders it is given, never the traces database or the "
                    "ratings CSV. Analytics are off and there is no share link; a host other than the loopback needs "
                    "--auth (or --insecure).\n\n"
                    "--bench prints how long each page takes to open (with --bench-make, on 1,000 traces and a 200-epoch "
                    "run written into a temporary folder first) and serves nothing.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--runs", default=None, help="folder of run directories (default: run.runs_dir)")
    p.add_argument("--data", nargs="*", default=None, help="folders (or manifest CSVs) the Data and Rate pages read "
                   "(default: data/)")
    p.add_argument("--traces", default=None, help="traces database (default: agents.traces)")
    p.add_argument("--ratings", default=None, help="ratings CSV the Rate page appends to (default: <runs>/ratings.csv)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="protect every page and API route with this login")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --auth")
    p.add_argument("--bench", action="store_true", help="time opening every page and print the seconds; serve nothing")
    p.add_argument("--bench-make", action="store_true", help="with --bench: write 1,000 traces and a 200-epoch run to a "
                   "temporary folder and time those")
    p.add_argument("--json", action="store_true", help="with --bench: print one JSON object")
    add_config_argument(p)
    p.set_defaults(handler=_dashboard)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must be USER:PASS, both non-empty")
    return user, password


def settings_from_args(args, cfg):
    from ..dashboard.app import DashboardSettings

    runs = Path(args.runs if args.runs is not None else cfg.run.runs_dir)
    data_dirs = [Path(d) for d in (args.data if args.data is not None else ["data"])]
    missing = [str(d) for d in data_dirs if not d.exists()]
    if missing and args.data is not None:
        raise UserError(f"--data: no such folder or file: {', '.join(missing)}")
    outputs = Path(cfg.agents.out)
    outputs.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    return DashboardSettings(runs_dir=runs, traces=Path(args.traces or cfg.agents.traces), ratings=Path(args.ratings or runs / "ratings.csv"),
                             data_dirs=[d for d in data_dirs if d.exists()], outputs=outputs, profile=args.config,
                             modalities=list(cfg.data.modalities), expert_levels=list(cfg.judges.selector.expert_weights))


def _dashboard(args, extra) -> int:
    cfg = resolve_config(args, extra)
    auth = parse_auth(args.auth)
    if not is_loopback(args.host) and auth is None and not args.insecure:
        raise UserError(f"--host {args.host} would serve the dashboard beyond this machine without a login; "
                        "give --auth USER:PASS (or --insecure if the network is yours alone)")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1-65535, got {args.port}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if args.bench:
        return _bench(args, cfg)
    from ..dashboard.app import build_app, launch, port_free

    if not port_free(args.host, args.port):
        raise UserError(f"port {args.port} on {args.host} is taken (another dashboard or program listens there); "
                        "choose another with --port")
    settings = settings_from_args(args, cfg)
    overrides, _ = parse_overrides(extra)
    app = build_app(settings, overrides=overrides)
    print(f"synthmed dashboard on http://{args.host}:{args.port} (runs {settings.runs_dir}, traces {settings.traces}, "
          f"ratings {settings.ratings}); Ctrl+C stops it")
    launch(app, settings, args.host, args.port, auth, block=True, quiet=True)
    return 0


def _bench(args, cfg) -> int:
    import tempfile

    from ..dashboard.bench import make_bench_folder, time_pages

    if args.bench_make:
        with tempfile.TemporaryDirectory(prefix="synthmed-dashboard-bench-") as tmp:
            started = time.perf_counter()
            made = make_bench_folder(Path(tmp))
            made_s = time.perf_counter() - started
            args.runs, args.traces, args.data = str(made["runs"]), str(made["traces"]), [str(made["data"])]
            times = time_pages(settings_from_args(args, cfg))
            return _print_times(args, times, made | {"seconds": round(made_s, 1)})
    return _print_times(args, time_pages(settings_from_args(args, cfg)), None)


def _print_times(args, times: dict, made: dict | None) -> int:
    if args.json:
        print(json.dumps({"pages": times, "made": {k: str(v) for k, v in (made or {}).items()}}, indent=2))
        return 0
    if made:
        print(f"wrote {made['traces_count']} traces and a {made['epochs']}-epoch run in {made['seconds']} s")
    width = max(len(k) for k in times)
    for page, t in times.items():
        print(f"{page.ljust(width)}  first open {t['first_s']:.3f} s, again {t['again_s']:.3f} s" + ("  (over 2 s)" if t["first_s"] > 2 else ""))
    return 0
