"""The `diffusion-dpo` console command.

Each subcommand lives in its own module (diffusion_dpo.commands.*), which exposes
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their subcommand runs, so
`diffusion-dpo --help` stays fast; they never import this module back.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# name -> (module, one-line help). A closed table: no registry, no plugins.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("diffusion_dpo.commands.train", "train Diffusion-DPO or SFT from a YAML config with dotted overrides"),
    "prepare": ("diffusion_dpo.commands.prepare", "encode a preference dataset once into a latent + text-embedding cache"),
    "bench": ("diffusion_dpo.commands.bench", "time training steps of our design against the official one"),
    "plan": ("diffusion_dpo.commands.plan", "per-device memory and FLOPs of a config, and which engine fits N devices"),
    "sample": ("diffusion_dpo.commands.sample", "sample a prompt set with fixed seeds (base, LoRA or tuned UNet)"),
    "evaluate": ("diffusion_dpo.commands.evaluate", "score sampled images with reward models and compare models"),
    "label": ("diffusion_dpo.commands.label", "re-judge preference pairs with a reward model (AI feedback)"),
    "generate-pairs": ("diffusion_dpo.commands.generate_pairs", "sample K images per prompt, score them, write pairs"),
    "iterate": ("diffusion_dpo.commands.iterate", "rounds of generate-pairs, label, prepare and train"),
    "demo": ("diffusion_dpo.commands.demo", "the whole story on a miniature text-to-image world, on a laptop CPU"),
}


# OS errors a user fixes on their side (a full disk, a read-only or foreign folder): one line, exit 2, any command.
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "not writable (read-only file system)", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}


def disk_error_message(err: OSError) -> str:
    where = err.filename if err.filename is not None else "a file (the system did not say which)"
    return (f"{DISK_ERRORS[err.errno]}: {where}: free space or fix the permissions there (or choose another output "
            "folder), then run the command again")


def build_parser(with_subcommands: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-dpo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == with_subcommands:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        build_parser().error(f"unknown command {command!r}; choose one of: {', '.join(COMMANDS)}")
    parser = build_parser(with_subcommands=command)
    args = parser.parse_args(argv)
    if args.version:
        from diffusion_dpo import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    from diffusion_dpo.errors import UserError

    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        print(f"error: {disk_error_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
