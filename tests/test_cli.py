"""The launch scripts' one command-line vocabulary and error policy (llmcxr_jax/cli.py), run as a
user runs them: every `launch/*.py --help` (exit 0, help text on every flag, defaults shown), and
one bad input per script (one line on stderr naming the flag or file, no traceback, exit 2 for a
usage error and 1 for a well-formed command that cannot run). Each run is its own process and
most import JAX, so they run side by side in threads."""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from llmcxr_jax import cli
from xla_flags import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRESS_BAR = re.compile(r"\[\d\d:\d\d[<,\]]")  # tqdm's "[00:00<" / "[00:00, 12.3 it/s]"
SCRIPTS = sorted(p.stem for p in (REPO / "launch").glob("*.py"))

# Runs launch/NAME.py as __main__ with --help after recording what its parser holds (each flag's
# help, default and the help line the formatter writes) in the JSON file named by argv[2].
HELP_DRIVER = """
import json, runpy, sys
from llmcxr_jax import cli
script, out = sys.argv[1], sys.argv[2]
original = cli.Parser.parse_args
def record(self, args=None, namespace=None):
    formatter = self._get_formatter()
    flags = [{"flag": a.option_strings[-1] if a.option_strings else a.dest,
              "help": a.help, "default": repr(a.default),
              "shown": formatter._get_help_string(a) if a.help else ""}
             for a in self._actions if a.help != "==SUPPRESS==" and a.dest != "help"]
    with open(out, "w") as f:
        json.dump(flags, f)
    return original(self, args, namespace)
cli.Parser.parse_args = record
sys.argv = [script, "--help"]
runpy.run_path(script, run_name="__main__")
"""


def _run(argv: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    # The launchers' own CPU split (2 devices), as a user's: no device count in XLA_FLAGS.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LLMCXR_CPU_DEVICES": "2",
           "XLA_FLAGS": xla_flags()}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _in_parallel(calls: dict[str, tuple[list[str], pathlib.Path]]
                 ) -> dict[str, subprocess.CompletedProcess]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run, argv, cwd) for name, (argv, cwd) in calls.items()}
        return {name: f.result() for name, f in futures.items()}


def _bad_inputs(tmp: pathlib.Path) -> dict[str, tuple[list[str], int, str]]:
    """Script -> (its flags, the exit code, a text its one-line error must hold)."""
    hf = tmp / "llama"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama",
                                                "architectures": ["LlamaForCausalLM"]}))
    yaml = tmp / "project.yaml"
    yaml.write_text("model: {}\n")
    reports = tmp / "reports.csv"
    reports.write_text("id,text\n1,No effusion.\n")
    missing = tmp / "missing"
    return {
        # usage errors: the command line itself is wrong (exit 2)
        "decode_images": (["--vqgan", "v", "--codes", "c", "--out", "o", "--batch-size", "-3"],
                          2, "--batch-size"),
        "encode_images": (["--vqgan", "v", "--images", "i", "--out", "o", "--batch-size", "0"],
                          2, "--batch-size"),
        "make_phantoms": (["--out", "o", "--n-studies", "0"], 2, "--n-studies"),
        "plan_memory": (["--mesh", "4x-1"], 2, "--mesh=4x-1"),
        "train": (["--config", "nope"], 2, "--config"),
        "train_vqgan": (["--images", "i", "--workdir", str(tmp / "w"), "--set", "nope=1"],
                        2, "unknown --set key 'nope'"),
        "generate": (["--workdir", "w", "--task", "draw"], 2, "--task"),
        "multiprocess": (["--processes", "2", "--", str(missing)], 2, "after --"),
        # well-formed, but it cannot run here (exit 1)
        "evaluate": (["--workdir", str(missing)], 1, str(missing)),
        "demo": (["--workdir", str(missing)], 1, str(missing)),  # a BundleError
        "export": (["--workdir", str(missing), "--format", "hf", "--out", "o", "--mesh", "3x3"],
                   1, "--mesh=3x3"),  # a MeshError
        "import_hf": (["--hf-dir", str(hf), "--out", "o"], 1, "llama"),  # an HFCheckpointError
        "import_taming": (["--ckpt", str(missing), "--yaml", str(yaml), "--out", "o"],
                          1, f"{yaml}: not a taming VQModel config"),  # a TamingImportError
        "label_reports": ([str(reports), "--out", str(tmp / "labels.csv")], 1, "'report'"),
        "train_classifier": (["--world", str(missing), "--workdir", "w"], 1, str(missing)),
        "train_tokenizer": (["--corpus", str(missing), "--out", "o"], 1, str(missing)),
    }


def test_every_script_has_help_on_every_flag_with_its_default(tmp_path):
    calls = {name: (["-c", HELP_DRIVER, str(REPO / "launch" / f"{name}.py"),
                     str(tmp_path / f"{name}.json")], tmp_path) for name in SCRIPTS}
    for name, proc in _in_parallel(calls).items():
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr[-2000:])
        flags = json.loads((tmp_path / f"{name}.json").read_text())
        assert flags, name
        for flag in flags:
            assert flag["help"], f"{name}: {flag['flag']} has no help text"
            assert flag["flag"] in proc.stdout, (name, flag["flag"])
            if flag["default"] not in ("None", "False", "''", "[]", "()"):
                assert "default" in flag["shown"], f"{name}: {flag['flag']} hides its default"


def test_every_script_says_what_is_wrong_in_one_line(tmp_path):
    cases = _bad_inputs(tmp_path)
    assert not set(SCRIPTS) - set(cases), "each launch script needs a bad input here"
    calls = {name: ([str(REPO / "launch" / f"{name}.py"), *argv], tmp_path)
             for name, (argv, _, _) in cases.items() if name in SCRIPTS}
    for name, proc in _in_parallel(calls).items():
        _, code, text = cases[name]
        lines = [line for line in proc.stderr.splitlines()  # less progress bars drawn before
                 if line.strip() and not PROGRESS_BAR.search(line)]
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])
        assert proc.returncode == code and len(lines) == 1, (name, proc.returncode, proc.stderr)
        assert lines[0].startswith("error: ") and text in lines[0], (name, lines[0])


def test_old_spellings_still_work_with_one_note(capsys):
    parser = cli.parser("doc")
    cli.add_batch_size(parser, 8)
    cli.add_no_progress(parser)
    parser.add_argument("--quiet-mode", action="store_true", help="a store_true flag")
    cli.add_alias(parser, "--batch", "--batch-size")
    cli.add_alias(parser, "--quiet", "--quiet-mode")
    args = parser.parse_args(["--batch", "4", "--quiet"])
    assert args.batch_size == 4 and args.quiet_mode is True
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: --batch is deprecated; use --batch-size",
                   "note: --quiet is deprecated; use --quiet-mode"]
    assert parser.parse_args([]).batch_size == 8  # the alias does not hide the default
    assert "--batch " not in parser.format_help()  # hidden from --help


def test_an_old_spelling_satisfies_a_required_flag(capsys):
    parser = cli.parser("doc")
    parser.add_argument("--workdir", required=True, help="where it goes")
    cli.add_alias(parser, "--out", "--workdir")
    assert parser.parse_args(["--out", "w"]).workdir == "w"
    assert parser.parse_args(["--workdir", "v"]).workdir == "v"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([])  # neither spelling: still a one-line usage error
    assert exit_.value.code == 2
    assert "required: --workdir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--batch", "0"])  # the alias keeps the flag's type
    assert info.value.code == 2


def test_expected_errors_resolve_and_exit_1_and_bugs_keep_their_traceback(capsys):
    classes = cli.resolve_expected_errors()
    assert len(classes) == len(cli.EXPECTED_ERRORS)
    assert all(isinstance(c, type) and issubclass(c, Exception) for c in classes)
    assert not [c for c in classes if re.search(r"exits? 2", c.__doc__ or "")]  # docs: exit 1

    def raising(err):
        def main(argv):
            raise err
        return main

    mesh_error = classes[[n for _, n in cli.EXPECTED_ERRORS].index("MeshError")]
    assert cli.call(raising(mesh_error("--mesh=3x3 needs 9 devices\nbut 2 are available"))) == 1
    assert capsys.readouterr().err == "error: --mesh=3x3 needs 9 devices but 2 are available\n"
    assert cli.call(raising(FileNotFoundError(2, "No such file or directory", "/x/y"))) == 1
    assert capsys.readouterr().err == "error: /x/y: No such file or directory\n"
    assert cli.call(raising(cli.UsageError("--steps: must be > 0"))) == 2
    with pytest.raises(ZeroDivisionError):  # not an expected failure: the whole traceback
        cli.call(raising(ZeroDivisionError("bug")))


def test_generate_tasks_match_the_job():
    from llmcxr_jax.llm import generate_job

    import runpy
    tasks = runpy.run_path(str(REPO / "launch" / "generate.py"))["TASKS"]
    assert tuple(tasks) == generate_job.TASKS


def test_every_benchmark_starts_as_the_readme_runs_it(tmp_path):
    """`python bench/NAME.py --help` from the repository root, as the README shows them: each
    benchmark's imports resolve in a plain checkout (bench/ is not a package)."""
    benches = sorted((REPO / "bench").glob("*.py"))
    calls = {p.stem: ([str(p.relative_to(REPO)), "--help"], REPO) for p in benches}
    for name, proc in _in_parallel(calls).items():
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr[-2000:])
