"""Command line: ``python -m bpcnn train|demo|sweep ...`` (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import RunConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per ``RunConfig`` field; unset flags are absent from the parsed namespace."""
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if "default" not in help_text:
            help_text += f" (default: {default})"
        if hint is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        kwargs: Dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(hint) in (list, List):
            kwargs.update(type=int, nargs="*")
        else:
            kwargs["type"] = base if base in (int, float, str) else str
        parser.add_argument(_flag(f.name), **kwargs)


def config_from_args(namespace: argparse.Namespace) -> RunConfig:
    """Build the run config: a saved config (``--config``) if given, overridden by the flags on the command line."""
    values = vars(namespace).copy()
    base: Dict[str, Any] = {}
    config_path = values.pop("config", None)
    for key in ("command", "verbose", "quiet"):
        values.pop(key, None)
    if config_path:
        base = RunConfig.load(Path(config_path)).to_dict()
    base.update(values)
    return RunConfig.from_dict(base)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _train(args: argparse.Namespace) -> int:
    from .training import train

    config = config_from_args(args)
    result = train(config)
    final = result.final
    if final and int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.run_dir}: {final['eval_split']} top-1 {final['eval_top1']:.4f}, "
              f"top-5 {final['eval_top5']:.4f} after {final['epoch']} epochs")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    table = run_demo(Path(args.runs_dir), Path(args.figure), data_root=args.data_root)
    print(table)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import signal

    from .sweep import default_workers, expand, format_outcomes, format_plan, load_sweep, plan, run_sweep

    sweep = load_sweep(Path(args.file))
    runs_dir = Path(args.runs_dir)
    if args.dry_run:
        print(format_plan(plan(expand(sweep, runs_dir, args.only))))
        return 0
    workers = args.workers if args.workers is not None else default_workers()
    # SIGTERM (a scheduler preempting the job) stops the papermill processes like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        outcomes = run_sweep(sweep, runs_dir, only=args.only, workers=workers)
    except KeyboardInterrupt:
        print("sweep interrupted; run the same command again to resume it", file=sys.stderr)
        return 130
    print(format_outcomes(outcomes))
    return 0 if all(outcome.state == "finished" for outcome in outcomes) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bpcnn", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one run (resumes from its run folder)")
    train.add_argument("--config", default=argparse.SUPPRESS,
                       help="a saved run config (config.json or its run folder); flags given here override it")
    add_config_arguments(train)
    train.set_defaults(handler=_train)

    demo = commands.add_parser("demo", help="train conv, LC and LC + instant sharing on Fashion-MNIST via the notebook")
    demo.add_argument("--runs-dir", default="runs/demo", help="folder for the three run folders")
    demo.add_argument("--figure", default="figures/demo_fashion_mnist.png", help="where to save the accuracy figure")
    demo.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: Debian's package folder)")
    demo.set_defaults(handler=_demo)

    sweep = commands.add_parser("sweep", help="execute the training notebook for every variant and seed of a sweep file")
    sweep.add_argument("file", help="sweep file (YAML), e.g. sweeps/fashion_mnist_cpu.yaml")
    sweep.add_argument("--runs-dir", default="runs", help="parent folder of the sweep's folder of runs (default: runs)")
    sweep.add_argument("--only", nargs="+", metavar="NAME", help="run only these variants or runs (<variant>_seed<seed>)")
    sweep.add_argument("--dry-run", action="store_true", help="list each run and whether it is new, resumed or finished")
    sweep.add_argument("--workers", type=int, default=None,
                       help="runs executed at once (default: one per visible GPU, or 1 without GPUs)")
    sweep.set_defaults(handler=_sweep)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    handler = args.handler
    del args.handler
    from .training import CheckpointError

    try:
        return handler(args)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
