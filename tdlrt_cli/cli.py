"""`tdlrt <subcommand> ...`: pick the subcommand, hand the rest of argv to its (Hydra) entry point.

Hydra parses everything after the subcommand, so `-m`, `--cfg job`, `--help`, `hydra.*` overrides and
launchers work as in any Hydra application.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

SUBCOMMANDS = {
    "train": "train a network (Hydra overrides: model=vgg16 tau=0.1 ...; -m to sweep; --help for config groups)",
    "report": "tables (md, csv, tex) and plots from run folders: tdlrt report outputs/... [out=DIR]",
    "bench": "time a training step: dense vs fixed-rank Tucker vs TDLRT (model=vgg16 batch_size=128 format=json)",
}

USAGE = "usage: tdlrt <subcommand> [hydra overrides...]\n\nsubcommands:\n" + "\n".join(
    f"  {name:<8} {text}" for name, text in SUBCOMMANDS.items()) + "\n\n`tdlrt <subcommand> --help` for its options."


def _resume_overrides(args: List[str]) -> List[str]:
    """A run resumed with ``ckpt_path=<run>/checkpoints/last.pt`` continues in ``<run>``.

    Hydra's files of the resumed session go to ``.hydra/resume-<time>`` there, so nothing the first
    session wrote is overwritten.
    """
    if any(a in ("-m", "--multirun") for a in args) or any(a.startswith("hydra.run.dir=") for a in args):
        return []
    ckpt = next((a.split("=", 1)[1] for a in args if a.startswith("ckpt_path=")), None)
    if not ckpt or ckpt in ("null", "None"):
        return []
    path = Path(ckpt.strip("'\"")).expanduser().resolve()
    if not path.is_file() or path.parent.name != "checkpoints":
        return []
    run_dir = str(path.parent.parent).replace("\\", "\\\\").replace("'", "\\'")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [f"hydra.run.dir='{run_dir}'", f"hydra.output_subdir=.hydra/resume-{stamp}"]


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    if args[0] in ("-V", "--version"):
        from . import __version__

        print(f"tdlrt {__version__}")
        sys.exit(0)
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"tdlrt: error: unknown subcommand {command!r}; choose one of: {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        sys.exit(2)
    if command == "report":
        from .report import main as report_main

        return report_main(rest)
    sys.argv = [f"tdlrt-{command}"] + rest + _resume_overrides(rest)
    if command == "train":
        from .train import main as entry
    else:
        from .bench import main as entry
    entry()


if __name__ == "__main__":
    main()
