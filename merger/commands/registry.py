"""`merger publish` and `merger registry list|show|export|rm|verify|push|gc`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merger.common.errors import MergerError

if TYPE_CHECKING:  # merger.registry imports mergekit and torch: `merger --help` must not wait for them
    from merger.registry import Entry, Registry

if TYPE_CHECKING:
    from merger.registry.finished_run import FinishedRun

EXIT_DAMAGED = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    publish = subparsers.add_parser(
        "publish",
        help="register a run's winner as a new registry version",
        description="Copy RUN_DIR/final (with its recipe, mergekit YAML, summary and a model card) "
        "into the registry as the next version of NAME.",
    )
    publish.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    publish.add_argument("--name", help="entry name (default: the recipe's output.publish)")
    _add_registry_flag(publish)
    publish.set_defaults(handler=_publish)

    registry = subparsers.add_parser("registry", help="list, show, export, remove, verify or push entries")
    _add_registry_flag(registry)
    actions = registry.add_subparsers(dest="registry_action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="every version, oldest first")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)

    show = actions.add_parser("show", help="one entry's record (latest version when omitted)")
    show.add_argument("reference", metavar="NAME[@VERSION]")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_show)

    export = actions.add_parser("export", help="copy a verified entry to a directory")
    export.add_argument("reference", metavar="NAME[@VERSION]")
    export.add_argument("destination", type=Path, metavar="DIR")
    export.set_defaults(handler=_export)

    remove = actions.add_parser("rm", help="delete one version")
    remove.add_argument("reference", metavar="NAME@VERSION")
    remove.set_defaults(handler=_remove)

    verify = actions.add_parser("verify", help="recompute hashes; exit 1 if anything is damaged")
    verify.add_argument("reference", nargs="?", metavar="NAME[@VERSION]")
    verify.set_defaults(handler=_verify)

    push = actions.add_parser("push", help="upload an entry to a Hugging Face Hub model repo")
    push.add_argument("reference", metavar="NAME[@VERSION]")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.set_defaults(handler=_push)

    garbage = actions.add_parser("gc", help="remove leftovers of interrupted publishes")
    garbage.set_defaults(handler=_collect_garbage)

    for action in (listing, show, export, remove, verify, push, garbage):
        # SUPPRESS: an action's unset flag must not overwrite `merger registry --registry DIR ACTION`
        _add_registry_flag(action, default=argparse.SUPPRESS)


def _add_registry_flag(parser: argparse.ArgumentParser, default: Any = None) -> None:
    parser.add_argument(
        "--registry",
        type=Path,
        default=default,
        metavar="DIR",
        help="registry root (default: $MERGER_REGISTRY, else the user data directory)",
    )


def _open(args: argparse.Namespace) -> Registry:
    from merger.registry import Registry

    return Registry(args.registry)


def _default_name(run: FinishedRun) -> str:
    name = run.recipe.output.publish
    if name is None:
        raise MergerError(f"no entry name: pass --name NAME (or set output.publish in {run.layout.recipe})")
    return name


def _publish(args: argparse.Namespace) -> int:
    from merger.registry.finished_run import read_run
    from merger.registry.publishing import publish_run

    run = read_run(args.run_dir)  # the recipe is parsed here, once
    name = args.name if args.name is not None else _default_name(run)
    ref = publish_run(_open(args), run, name)
    print(f"published {ref} at {ref.path}")
    from merger.tracking import note_published

    note_published(args.run_dir, run.recipe, str(ref))
    return 0


def _entry_as_dict(entry: Entry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "version": entry.version,
        "path": str(entry.path),
        "created_at": entry.created_at,
        "method": entry.method,
        "fitness": entry.fitness,
        "scores": entry.scores,
        "parents": [vars(parent) for parent in entry.parents],
        "children": entry.children,
        "files": {name: vars(record) for name, record in entry.files.items()},
        "genotype": (entry.summary.get("winner") or {}).get("genotype"),
        "budget": entry.summary.get("budget"),
        "evaluations": entry.summary.get("evaluations"),
    }


def _scores_text(scores: dict[str, dict[str, float]], split: str) -> str:
    return " ".join(f"{task}={value:.3f}" for task, value in sorted((scores.get(split) or {}).items())) or "-"


def _list(args: argparse.Namespace) -> int:
    entries = _open(args).entries()
    if args.json:
        print(json.dumps([_entry_as_dict(entry) for entry in entries], indent=2))
        return 0
    if not entries:
        print("the registry is empty")
        return 0
    rows = [("ENTRY", "CREATED", "METHOD", "FITNESS", "VALIDATION")]
    rows += [
        (
            str(entry.ref),
            entry.created_at,
            entry.method or "-",
            "-" if entry.fitness is None else f"{entry.fitness:.4f}",
            _scores_text(entry.scores, "validation"),
        )
        for entry in entries
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join([*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)), row[-1]])
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    entry = _open(args).show(args.reference)
    if args.json:
        print(json.dumps(_entry_as_dict(entry), indent=2))
        return 0
    details = _entry_as_dict(entry)
    print(f"{entry.ref}  ({entry.path})")
    print(f"  created     {entry.created_at}")
    print(f"  method      {entry.method or '-'}")
    print(f"  fitness     {'-' if entry.fitness is None else f'{entry.fitness:.4f}'}")
    print(f"  validation  {_scores_text(entry.scores, 'validation')}")
    print(f"  test        {_scores_text(entry.scores, 'test')}")
    print(f"  genotype    {details['genotype']}")
    print(f"  budget      {details['budget']} (evaluations used: {details['evaluations']})")
    print("  parents")
    for parent in entry.parents:
        print(f"    {parent.source}: {parent.kind} {parent.reference} sha256={parent.sha256 or 'unknown'}")
    if entry.children:
        print(f"  children    {', '.join(entry.children)}")
    print(f"  files       {len(entry.files)} ({sum(record.size for record in entry.files.values())} bytes)")
    return 0


def _export(args: argparse.Namespace) -> int:
    destination = _open(args).export(args.reference, args.destination)
    print(f"exported {args.reference} to {destination}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    ref = _open(args).remove(args.reference)
    print(f"removed {ref}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    results = _open(args).verify(args.reference)
    for result in results:
        print(f"ok {result.ref}" if result.ok else f"DAMAGED {result.ref}: " + "; ".join(result.problems()))
    damaged = sum(not result.ok for result in results)
    print(f"{len(results)} checked, {damaged} damaged")
    return EXIT_DAMAGED if damaged else 0


def _push(args: argparse.Namespace) -> int:
    url = _open(args).push(args.reference, args.repo_id, private=args.private)
    print(f"pushed {args.reference} to {url}")
    return 0


def _collect_garbage(args: argparse.Namespace) -> int:
    removed = _open(args).collect_garbage()
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} leftovers removed")
    return 0
