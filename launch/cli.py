"""The ``disagg`` command line: serve, scale, model prepare, bench."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

import httpx

from disagg.bench.cli import add_parser as add_bench
from disagg.launch.topology import TopologyError, load_topology, parse_topology
from disagg.models import cli_prepare


def _serve(args: argparse.Namespace) -> int:
    # Here, not at the top: Ray and the serving plane load in seconds, and only `serve`
    # needs them.
    from disagg.launch.api import StartupError, launch

    try:
        topo = load_topology(args.topology) if args.topology else parse_topology({})
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Until serving starts, SIGTERM interrupts like Ctrl-C (launch() cleans up what it began).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        dep = launch(topo, address=args.address, port=args.port)
    except KeyboardInterrupt:
        return 130
    except StartupError as exc:  # launch() stopped everything it began
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(f"disagg: serving {dep.served_model_name!r} at {dep.url}", flush=True)
        for inst in dep.status()["instances"]:
            print(f"  {inst['key']:<10} {inst['engine_id']:<22} {inst['url']}", flush=True)
        stop.wait()
    finally:
        print("disagg: shutting down", flush=True)
        dep.shutdown()
    return 0


def _scale(args: argparse.Namespace) -> int:
    body = {k: v for k, v in (("prefill", args.prefill), ("decode", args.decode))
            if v is not None}
    if not body:
        print("error: give --prefill and/or --decode", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.post(args.url.rstrip("/") + "/v1/disagg/scale", json=body, headers=headers,
                       timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"error: {args.url}: {exc}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"error: HTTP {r.status_code}: {r.text}", file=sys.stderr)
        return 1
    for inst in r.json()["instances"]:
        print(f"{inst['key']:<10} {inst['role']:<8} {inst['engine_id']:<22} {inst['url']}")
    print(json.dumps({"scaled": body}))
    return 0


def _model_prepare(args: argparse.Namespace) -> int:

    return cli_prepare(args.name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disagg", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a topology (default: built-in tiny model, 1P1D)")
    s.add_argument("topology", nargs="?", help="topology YAML (default: embedded 1P1D)")
    s.add_argument("--port", type=int, default=None, help="gateway port (overrides api.port)")
    s.add_argument("--address", default=None, help="Ray cluster to join (default: "
                   "the job's cluster under `ray job submit`, else a local one)")
    s.set_defaults(func=_serve)
    sc = sub.add_parser("scale", help="resize the pools of a running deployment")
    sc.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    sc.add_argument("--prefill", type=int, default=None, help="prefill instances wanted")
    sc.add_argument("--decode", type=int, default=None, help="decode instances wanted")
    sc.add_argument("--api-key", default=None, help="the gateway's API key, if set")
    sc.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait")
    sc.set_defaults(func=_scale)
    m = sub.add_parser("model", help="built-in models")
    msub = m.add_subparsers(dest="model_command", required=True)
    mp = msub.add_parser("prepare", help="build a built-in model; prints its path last")
    mp.add_argument("name")
    mp.set_defaults(func=_model_prepare)
    add_bench(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
