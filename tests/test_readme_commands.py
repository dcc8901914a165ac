"""The README's commands, run as written: every command of its ```bash blocks, in README order, in
a subprocess from one fresh temporary directory laid out like the repository root (its top-level
entries linked in, so `launch/...` resolves and `workdir/` is created there, not in the checkout).
A README line that no longer runs fails here with the command and the end of its output.

What is not run as written, and why:

* Setup (`python3 -m venv`, `. .venv/bin/activate`, `pip install`, `python -m pytest`): CI itself
  runs exactly these (`.ci/run`); rerunning pip or pytest inside pytest would only repeat them.
* Runnable commands get CI-sized overrides appended (`SHRINK`, per script; only documented
  flags): the full sizes take minutes to hours on CI's 2 cores. Each entry says what it shrinks.
* `some.png` (`--image some.png`) is a file the user must have: the test draws it (`USER_FILES`).
* A block that names absolute paths (`/data/...`, `/models/...`: the paper's recipe on the user's
  MIMIC-CXR-JPG and dolly-v2-3b) cannot run here: each of its commands runs as written and must
  stop with a one-line error about its missing input (which shows that its flags parse and that
  it checks its inputs) rather than a traceback or an argparse usage error.

The mesh commands run on the device counts their `XLA_FLAGS=` prefix gives; the others get the
launchers' default CPU split, as a user's would (the suite's device count is not passed on; its
compile flags, `tests/xla_flags.py`, are).

A command this file does not know fails the test with a message naming what to add.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Any

import numpy as np

from xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"

def train_shrink(command: "Command") -> list[str]:
    """Every train.py command (the default phantom run, the 4x4 tiny run): a 40-study world
    (enough for a 2-image test split and a held-out split), 1 VQ-GAN step, 1 step of each LLM
    stage (and of the base model, and the clinical classifier, where the preset trains one), one
    sample. The full default takes ~11 minutes on 2 cores, the tiny preset on 16 simulated
    devices ~4."""
    from llmcxr_jax.train import run_config as rc

    argv = command.argv
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if preset is None and "--config" in argv:
        preset = argv[argv.index("--config") + 1]
    sets = ["world.n_studies=40", "world.n_instructions=40", "vqgan.steps=1", "samples=1"]
    if rc.run_preset(preset or "phantom").base_steps > 0:
        sets.append("base_steps=1")
    if rc.run_preset(preset or "phantom").clinical.trains_here:
        sets.append("clinical.steps=1")
    return [*(x for s in sets for x in ("--set", s)), "--steps", "1"]


# Script -> the flags appended to its README commands (documented flags only; a list, or a
# function of the command). None: the script only appears in user-data blocks (see the module
# docstring) and has no CI-sized run.
SHRINK: dict[str, Any] = {
    "launch/train.py": train_shrink,
    "launch/multiprocess.py": train_shrink,  # its train.py run (2 processes), shrunk the same way
    # 2 test items, a 2-step classifier, 2 language items, 8-token reports, no image grid.
    "launch/evaluate.py": ["--n-test", "2", "--classifier-steps", "2", "--n-language", "2",
                           "--report-tokens", "8", "--n-show", "0"],
    # Reports of at most 8 tokens (report -> image always draws exactly one image's codes).
    "launch/generate.py": ["--max-new-tokens", "8"],
    "launch/export.py": [],  # seconds as written
    "launch/import_hf.py": None,
    "launch/import_taming.py": None,
    "launch/encode_images.py": None,
}

# Shell steps CI runs itself (.ci/run): skipped here.
SETUP = (("python3", "-m", "venv"), ("python", "-m", "venv"), (".",), ("source",), ("pip",),
         ("python", "-m", "pip"), ("python", "-m", "pytest"), ("python3", "-m", "pytest"))


def _draw_some_png(path: pathlib.Path) -> None:
    """A user's chest X-ray stand-in: a 64 px grey gradient with a bright disc."""
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    image = 60 + 2 * y + 80 * (((x - 32) ** 2 + (y - 36) ** 2) < 15 ** 2)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)


USER_FILES = {"some.png": _draw_some_png}

ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", ";", "||"}


@dataclasses.dataclass
class Command:
    line: str  # as in the README
    env: dict[str, str]
    argv: list[str]
    block: int  # index of its code block
    user_data: bool  # in a block that names absolute paths (the user's data)

    @property
    def script(self) -> str | None:
        if len(self.argv) > 1 and self.argv[0] in ("python", "python3") \
                and self.argv[1].endswith(".py"):
            return self.argv[1]
        return None

    def is_setup(self) -> bool:
        return any(tuple(self.argv[:len(s)]) == s for s in SETUP)


def readme_blocks(text: str) -> list[list[str]]:
    """The lines of each ```bash / ```sh / ```shell block, backslash continuations joined."""
    blocks: list[list[str]] = []
    lines: list[str] = []
    in_block = is_shell = False
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            if not in_block:
                in_block, lines = True, []
                is_shell = stripped[3:].strip() in ("bash", "sh", "shell")
            else:
                if is_shell:
                    blocks.append(lines)
                in_block = False
            continue
        if in_block and is_shell and stripped:
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1].rstrip() + " " + stripped
            else:
                lines.append(stripped)
    return blocks


def readme_commands(text: str) -> list[Command]:
    commands = []
    for b, lines in enumerate(readme_blocks(text)):
        user_data = any(re.search(r"(^|\s|=)/(data|models|mnt|home|gcs)/", line) for line in lines)
        for line in lines:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens, part = list(lexer), []
            for token in tokens + [";"]:
                if token in SEPARATORS:
                    if part:
                        env = {}
                        while part and ENV_ASSIGNMENT.match(part[0]):
                            key, _, value = part.pop(0).partition("=")
                            env[key] = value
                        commands.append(Command(line, env, part, b, user_data))
                    part = []
                elif token in ("|", "&", ">", "<", ">>", "(", ")"):
                    raise AssertionError(f"README line {line!r}: {token!r} is not supported by "
                                         f"tests/test_readme_commands.py; extend its parser")
                else:
                    part.append(token)
    return commands


def test_the_parser_reads_the_readme_as_a_shell_would():
    text = ("```bash\npython3 -m venv .venv && . .venv/bin/activate && "
            "python launch/train.py\n```\n"
            "```\nnot a shell block\n```\n```bash\nX=1 python launch/a.py --r \"a b.\"  # note\n"
            "python launch/b.py --x 1 \\\n    --y /data/z\n```\n")
    commands = readme_commands(text)
    assert [c.argv for c in commands] == [
        ["python3", "-m", "venv", ".venv"], [".", ".venv/bin/activate"],
        ["python", "launch/train.py"], ["python", "launch/a.py", "--r", "a b."],
        ["python", "launch/b.py", "--x", "1", "--y", "/data/z"]]
    assert commands[3].env == {"X": "1"} and commands[3].script == "launch/a.py"
    assert [c.is_setup() for c in commands] == [True, True, False, False, False]
    assert [c.user_data for c in commands] == [False] * 3 + [True] * 2


def _fresh_root(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory that looks like the repository root to the README's commands."""
    root = tmp_path / "repo"
    root.mkdir()
    for entry in REPO.iterdir():
        if not entry.name.startswith(".") and entry.name not in ("workdir", "serve", "hf"):
            (root / entry.name).symlink_to(entry)
    return root


def _env(command: Command) -> dict[str, str]:
    """The command's environment: the suite's without its device count (the command's own
    `XLA_FLAGS=` prefix, or else the launchers' split, decides it), plus the command's prefix;
    the suite's compile flags (`xla_flags`) are kept."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "LLMCXR_CPU_DEVICES", "PYTEST_XDIST_WORKER")}
    env["JAX_PLATFORMS"] = "cpu"  # the suite is CPU-only
    env.update(command.env)
    env["XLA_FLAGS"] = " ".join([xla_flags(), *command.env.get("XLA_FLAGS", "").split()])
    return env


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def test_readme_commands_run_as_written(tmp_path):
    commands = readme_commands(README.read_text())
    assert any(c.script == "launch/train.py" and not c.user_data for c in commands), \
        "the README no longer has a `python launch/train.py` command"
    unknown = [c.line for c in commands if not c.is_setup() and c.script not in SHRINK]
    assert not unknown, (
        f"README commands that tests/test_readme_commands.py does not know: {unknown}. Add each "
        f"script to SHRINK with the documented flags that make it fit CI ([] if it is fast as "
        f"written), or to SETUP if CI runs it itself")
    root = _fresh_root(tmp_path)
    timings = []
    for command in commands:
        if command.is_setup():
            continue
        overrides = SHRINK[command.script]
        if not command.user_data:
            assert overrides is not None, (
                f"{command.line!r} is runnable here but SHRINK has no CI-sized flags for "
                f"{command.script}: add them")
            for name in command.argv:
                if name in USER_FILES and not (root / name).exists():
                    USER_FILES[name](root / name)
        argv = [sys.executable, *command.argv[1:]]
        if not command.user_data:
            argv += overrides(command) if callable(overrides) else overrides
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=root, env=_env(command), capture_output=True, text=True,
                              timeout=600)
        timings.append((round(time.perf_counter() - start, 1), command.line))
        output = proc.stdout + proc.stderr
        if command.user_data:
            # Needs the user's files: a clean one-line stop about a missing input, no traceback.
            assert proc.returncode != 0, f"{command.line!r} ran without the user's data?\n" \
                                         f"{_tail(output)}"
            assert "Traceback" not in output and "usage:" not in output, (
                f"{command.line!r} (as written, without the user's files) should stop with a "
                f"one-line error about the missing input, got:\n{_tail(output)}")
            continue
        assert proc.returncode == 0, (
            f"README command failed (exit {proc.returncode}): {command.line}\n"
            f"run as: {' '.join(shlex.quote(a) for a in argv)}\n{_tail(output, 40)}")
        assert "Traceback" not in output, f"{command.line}: a traceback\n{_tail(output, 40)}"
    print("README command timings (s):", *timings, sep="\n  ")
