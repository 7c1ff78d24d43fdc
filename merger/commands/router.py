"""`merger router train|eval POOL.yaml` and `merger serve POOL.yaml`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from merger.commands import positive_int
from merger.common.extras import require_extra

DEFAULT_PORT = 8321


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train(args: argparse.Namespace) -> int:
    require_extra("router", "merger router train")
    from merger.conductor.depth import depth_generation, workflow_key
    from merger.router.pool import load_pool
    from merger.router.training import head_dir, train_router

    pool = load_pool(args.pool)
    head = train_router(pool, _progress, workflow_key(depth_generation(pool)))
    print(
        f"router head: {head.num_parameters} parameters, {head.meta['evaluations']} evaluations, "
        f"trained on {head.meta['train_items']} items; saved to {head_dir(pool)}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    require_extra("router", "merger router eval")
    from merger.router.pool import load_pool

    pool = load_pool(args.pool)
    if args.saved_head:
        from merger.router.evaluation import format_report
        from merger.router.training import evaluate_router

        report = evaluate_router(pool, _progress)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0
    from merger.router.comparison import format_comparison
    from merger.router.training import compare_over_splits

    comparison = compare_over_splits(pool, args.splits, args.holdout, _progress)
    print(json.dumps(comparison, indent=2) if args.json else format_comparison(comparison))
    return 0


def _serve(args: argparse.Namespace) -> int:
    require_extra("router", "merger serve")
    import uvicorn

    from merger.conductor.app import create_app
    from merger.conductor.routing import build_conductor
    from merger.conductor.serving import uvicorn_config
    from merger.router.pool import load_pool

    pool = load_pool(args.pool)
    conductor = build_conductor(pool)
    app = create_app(conductor)
    order = "routed by the trained head" if conductor.head is not None else "static order"
    _progress(f"merger conductor on http://{args.host}:{args.port}/v1 ({len(pool.members)} members, {order})")
    uvicorn.Server(uvicorn_config(app, pool.server, args.host, args.port)).run()
    return 0


def _depth(args: argparse.Namespace) -> int:
    require_extra("router", "merger router depth")
    from merger.conductor.depth import format_depth, measure_depth
    from merger.router.pool import load_pool

    pool = load_pool(args.pool)
    report = measure_depth(pool, args.per_task, _progress)
    print(json.dumps(report, indent=2) if args.json else format_depth(report))
    print("`merger router train` now learns the confident gate from these outcomes", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    router = subparsers.add_parser("router", help="train and evaluate the router over a pool")
    actions = router.add_subparsers(dest="router_command", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="build the outcome table (cached) and train the head")
    train.add_argument("pool", type=Path, help="pool YAML")
    train.set_defaults(handler=_train)
    evaluate = actions.add_parser(
        "eval", help="merge or route: each member, the router, baselines and the oracle on held-out splits"
    )
    evaluate.add_argument("pool", type=Path, help="pool YAML")
    evaluate.add_argument(
        "--splits",
        type=positive_int,
        default=5,
        help="train/held-out splits, each with a fresh head (default 5)",
    )
    evaluate.add_argument(
        "--holdout",
        type=_fraction,
        default=None,
        help="held-out fraction of each task (default router.holdout_fraction)",
    )
    evaluate.add_argument(
        "--saved-head",
        action="store_true",
        help="instead: the head saved by `router train` on its own held-out split, per task and cost-quality",
    )
    evaluate.add_argument("--json", action="store_true", help="print the full report as JSON")
    evaluate.set_defaults(handler=_eval)

    depth = actions.add_parser(
        "depth", help="plan-execute-verify against one call per task, and the confident gate learned from it"
    )
    depth.add_argument("pool", type=Path, help="pool YAML (its head trained by `router train`)")
    depth.add_argument(
        "--per-task", type=positive_int, default=25,
        help="items of each task measured from each split, training and held-out (default 25)",
    )
    depth.add_argument("--json", action="store_true", help="print the full report as JSON")
    depth.set_defaults(handler=_depth)

    serve = subparsers.add_parser("serve", help="OpenAI-compatible conductor over a pool")
    serve.add_argument("pool", type=Path, help="pool YAML")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.set_defaults(handler=_serve)
