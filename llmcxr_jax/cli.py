"""The launch scripts' shared command line: one parser, the flags they share, one error policy.

Every `launch/*.py` builds its parser with `parser()`, adds the shared flags with the `add_*`
helpers (the README's flag table lists their names and meanings) and runs its `main` through
`run()`, which turns an expected failure into one line on stderr, no traceback: exit 2 when the
command line itself is wrong (`UsageError`, argparse's own errors), exit 1 when it is well-formed
but cannot run here (the library's error classes in `EXPECTED_ERRORS`, missing or unreadable
files). Nothing here imports JAX, so `--help` and usage errors stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NoReturn, Sequence

# The library's error classes a user can cause (module, class name): printed in one line, exit 1.
# Looked up in sys.modules when something fails (a class can only be raised once its module is
# imported), so listing one costs no import; tests/test_cli.py checks that every entry resolves.
EXPECTED_ERRORS: tuple[tuple[str, str], ...] = (
    ("llmcxr_jax.parallel.mesh", "MeshError"),
    ("llmcxr_jax.llm.hf_io", "HFCheckpointError"),
    ("llmcxr_jax.llm.serving", "BundleError"),
    ("llmcxr_jax.llm.checkpoint", "CheckpointError"),
    ("llmcxr_jax.llm.generate_job", "InputError"),
    ("llmcxr_jax.train.checkpoint", "CheckpointError"),
    ("llmcxr_jax.train.run", "SetupError"),
    ("llmcxr_jax.train.step_record", "StepConflict"),
    ("llmcxr_jax.data.images", "ImageError"),
    ("llmcxr_jax.eval.protocol", "EvalInputError"),
    ("llmcxr_jax.text.prompts", "PromptError"),
    ("llmcxr_jax.vqgan.taming_import", "TamingImportError"),
    ("llmcxr_jax.vqgan.taming_import", "UnsafeCheckpointError"),
)
# Missing, unreadable or misplaced files and folders: exit 1, naming the path.
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FileExistsError)


class UsageError(Exception):
    """The command line itself is wrong (a flag's value, an unknown name): one line, exit 2."""


class Failure(Exception):
    """Well-formed, but it cannot run here (bad data, a file of the wrong kind): one line, exit 1.
    For the library's plain ValueErrors that a script knows to be about its input."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout and appends each flag's default (unless the help states it,
    or there is none to state: None, False, an empty string or list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS
                or (isinstance(default, (str, list, tuple)) and not default)
                or "default" in text or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (`error: ...`), exit 2, and whose
    required flags may be given by a deprecated alias (see `add_alias`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.required_by_alias: list[argparse.Action] = []  # checked after parsing, not by argparse

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        missing = [a.option_strings[0] for a in self.required_by_alias
                   if getattr(namespace, a.dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(doc: str | None, *, epilog: str | None = None) -> Parser:
    """The parser every launch script starts from: its module docstring as the description."""
    return Parser(description=doc, epilog=epilog, formatter_class=HelpFormatter)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, else a one-line usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)  # a batch size, a step count
non_negative_int = int_at_least(0)  # a seed, a count where 0 means 'none' or 'all'


# --- the shared flags (one name, one meaning: the README's flag table) ---

def add_mesh(p: argparse.ArgumentParser, default: str | None = "-1", what: str = "") -> None:
    p.add_argument("--mesh", default=default,
                   help=f"device mesh{what}: 4x4 (data x fsdp), 2x4x2 (+ tensor), "
                        "data:2,fsdp:4,tensor:2; -1 fills one axis with every device")


def add_batch_size(p: argparse.ArgumentParser, default: int | None, what: str = "") -> None:
    p.add_argument("--batch-size", type=positive_int, default=default,
                   help=f"global batch, all devices together{what}")


def add_seed(p: argparse.ArgumentParser, default: int | None = 0, what: str = "") -> None:
    p.add_argument("--seed", type=non_negative_int, default=default, help=f"random seed{what}")


def add_vqgan(p: argparse.ArgumentParser, *, required: bool = False, what: str = "") -> None:
    p.add_argument("--vqgan", required=required, default=None,
                   help=f"a VQ-GAN: a workdir holding vqgan/, or a VQ-GAN checkpoint folder{what}")


def add_step(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step", type=non_negative_int, default=None,
                   help="the checkpoint step to read (default: the latest)")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (progress is on by default)")


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: sets the new flag's value and says, in one line, to move on."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_alias(p: Parser, old: str, new: str) -> None:
    """Accept `old` for the already-added flag `new` (hidden from --help, one note when used).
    A required `new` is then satisfied by either spelling: argparse only counts the flag's own
    action as given, so the parser checks the value after parsing instead."""
    target = p._option_string_actions[new]  # argparse keeps no public lookup by option string
    if target.required:
        target.required = False
        p.required_by_alias.append(target)
    p.add_argument(old, dest=target.dest, action=_DeprecatedAlias, new=new, nargs=target.nargs,
                   const=target.const, type=target.type, choices=target.choices,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


# --- running a script's main ---

def expected_errors() -> tuple[type[BaseException], ...]:
    """The classes of EXPECTED_ERRORS whose modules are imported (only those can be raised)."""
    found = []
    for module, name in EXPECTED_ERRORS:
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def resolve_expected_errors() -> tuple[type[BaseException], ...]:
    """Import every module of EXPECTED_ERRORS and return its classes (for tests)."""
    return tuple(getattr(importlib.import_module(m), n) for m, n in EXPECTED_ERRORS)


def one_line(err: BaseException) -> str:
    """An exception as one line: OSErrors name their file, KeyErrors lose their quotes."""
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err}"
    elif isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def call(main: Callable[[Sequence[str] | None], int | None],
         argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` and return its exit code, expected failures as one line on stderr."""
    try:
        return main(argv) or 0
    except UsageError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - anything not listed is a bug: re-raised whole
        if isinstance(err, (Failure, *FILE_ERRORS, *expected_errors())):
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 1
        raise


def run(main: Callable[[Sequence[str] | None], int | None]) -> NoReturn:
    """A launch script's `if __name__ == "__main__":` line."""
    sys.exit(call(main))
