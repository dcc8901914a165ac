"""Multi-process training for real: `launch/multiprocess.py` runs `launch/train.py` as 2 JAX
processes x 2 CPU devices on a 2x2 mesh (gloo collectives over 127.0.0.1), the code path of a
TPU pod's hosts. One workdir goes through three runs of the same command:

    run 1   SIGTERM to process 1 at step ~2     -> both save the same step, exit 0
    run 2   resumes; SIGKILL process 1 one step after a checkpoint -> process 0 stops on its own
            (its next collective loses the peer), the launcher exits non-zero
    run 3   resumes from the last complete checkpoint and finishes (final LLM, samples)

and the per-step losses of all three are compared with a 1-process reference on 4 devices fed
the same global batches (each host's shard of the data, concatenated), computed here. The
finished workdir then serves launch/generate.py, evaluate.py and export.py (their `main`s, one
after another in one process: one JAX start-up instead of three), and a serving export written
by 2 processes restores in this one with the same logits.

Where the time goes: every launch starts JAX in each process, and process 1 compiles every
program afresh (JAX writes the persistent compilation cache from process 0 only, and keys it by
the process's device topology), so the test keeps launches and programs few: three training
runs, the fewest two faults and two restarts allow; a random classifier for the evaluation
instead of one it would train; one guidance scale.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llmcxr_jax import configs
from llmcxr_jax.data import pipeline as pipeline_lib
from llmcxr_jax.eval import classifier as clf
from llmcxr_jax.llm import serving
from llmcxr_jax.llm.model import GPTNeoX
from llmcxr_jax.parallel import local_cluster
from llmcxr_jax.parallel import mesh as mesh_lib
from llmcxr_jax.parallel.rules import rules_for
from llmcxr_jax.parallel.shardings import batch_sharding
from llmcxr_jax.text.vocab import Vocab
from llmcxr_jax.train import run as run_lib
from llmcxr_jax.train import run_config as rc
from llmcxr_jax.train.metrics import read_jsonl
from llmcxr_jax.train.state import state_from_params
from llmcxr_jax.train.step import make_train_step
from llmcxr_jax.vqgan.checkpoint import save_vqgan
from llmcxr_jax.vqgan.model import init_params as init_vqgan_params

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8
CHECKPOINT_EVERY = 2
HEARTBEAT_S = 10
TIMEOUT_S = 400


def _train_argv(workdir: pathlib.Path, vqgan: pathlib.Path) -> list[str]:
    """A tiny stage-1 run: 40 phantom studies, a given (random) VQ-GAN, global batch 8 of 256
    tokens, each step's loss logged, a checkpoint every 2, the conditioning gap on 4 pairs per
    set at the end."""
    sets = ["world.n_studies=40", "world.n_instructions=40", f"vqgan_dir={vqgan}", "samples=1",
            "stage1.log_every=1", f"stage1.checkpoint_every={CHECKPOINT_EVERY}",
            "stage1.keep_checkpoints=3", "stage1.gap_pairs=4", "stage1.eval_batches=0",
            "train.global_batch=8", "train.seq_len=256"]
    return ["launch/train.py", "--config", "tiny", "--mesh", "2x2", "--workdir", str(workdir),
            "--stage", "1", "--steps", str(STEPS), *(x for s in sets for x in ("--set", s))]


def _env(cache: pathlib.Path) -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


class Launch:
    """`launch/multiprocess.py` running a script as 2 processes x 2 devices; its output lines."""

    def __init__(self, script_argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "launch/multiprocess.py", "--processes", "2",
             "--devices-per-process", "2", "--heartbeat-timeout", str(HEARTBEAT_S),
             "--grace", "60", "--timeout", str(TIMEOUT_S), "--", *script_argv],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.pids: dict[int, int] = {}

    def wait_for(self, pattern: str) -> re.Match:
        """Read output until a line matches `pattern`."""
        deadline = time.monotonic() + TIMEOUT_S
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if m := re.match(r"\[multiprocess\] process (\d): pid (\d+)", line):
                self.pids[int(m[1])] = int(m[2])
            if m := re.search(pattern, line):
                return m
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise AssertionError(f"no line matched {pattern!r}; last lines:\n" +
                             "\n".join(self.lines[-40:]))

    def finish(self) -> int:
        out, _ = self.proc.communicate(timeout=TIMEOUT_S)
        self.lines += out.splitlines()
        return self.proc.returncode

    def text(self, process: int | None = None) -> str:
        prefix = "" if process is None else f"[p{process}] "
        return "\n".join(line for line in self.lines if line.startswith(prefix))


def _losses(records: list[dict]) -> dict[int, tuple[float, float]]:
    """step -> (loss, loss tokens) of the logged train steps. The token count tells batches
    apart where the loss cannot: near initialisation every batch's loss is about log(vocab)."""
    return {r["step"]: (r["loss"], r["loss_tokens"]) for r in records if r.get("loss") is not None}


def _checkpoints(workdir: pathlib.Path) -> list[int]:
    root = workdir / "stage1" / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    vqgan_cfg = configs.vqgan_preset("phantom-f8-64")
    save_vqgan(root / "vqgan", vqgan_cfg, init_vqgan_params(vqgan_cfg, 0))
    workdir, env = root / "run", _env(root / "jax_cache")
    argv = _train_argv(workdir, root / "vqgan")
    out: dict = {"workdir": workdir, "root": root, "env": env}

    def metrics_lines() -> int:
        path = workdir / "stage1" / "metrics.jsonl"
        return len(read_jsonl(path)) if path.exists() else 0

    # Run 1: a preempted host.
    cut = Launch(argv, env)
    cut.wait_for(r"^\[p0\] stage 1 step 2/")
    os.kill(cut.pids[1], signal.SIGTERM)
    out["cut"] = dict(code=cut.finish(), text=cut.text(), p0=cut.text(0), p1=cut.text(1),
                      checkpoints=_checkpoints(workdir), records=read_jsonl(
                          workdir / "stage1" / "metrics.jsonl"))
    preempted = re.search(r"stage 1: preempted at step (\d+)", out["cut"]["p0"])
    assert preempted, out["cut"]["text"][-4000:]
    stop = int(preempted[1])

    # Run 2: a host dies after the restart, one step after a checkpoint step: process 0 is then
    # in a train step's collective, which fails at once (in a checkpoint's barrier it would wait
    # for the heartbeat timeout).
    first = metrics_lines()
    killed = Launch(argv, env)
    saved = next(s for s in range(stop + 1, STEPS) if s % CHECKPOINT_EVERY == 0)
    kill_at = saved + 1
    assert kill_at < STEPS  # steps remain in which process 0 meets the loss
    killed.wait_for(rf"^\[p0\] stage 1 step {kill_at}/")
    os.kill(killed.pids[1], signal.SIGKILL)
    start = time.monotonic()
    code = killed.finish()
    out["killed"] = dict(code=code, seconds=time.monotonic() - start, text=killed.text(),
                         checkpoints=_checkpoints(workdir), saved=saved,
                         records=read_jsonl(workdir / "stage1" / "metrics.jsonl")[first:])

    # Run 3: the same command finishes the run.
    first = metrics_lines()
    final = Launch(argv, env)
    out["final"] = dict(code=final.finish(), text=final.text(), p1=final.text(1),
                        records=read_jsonl(workdir / "stage1" / "metrics.jsonl")[first:])
    assert out["final"]["code"] == 0, out["final"]["text"][-4000:]
    return out


@functools.lru_cache(maxsize=None)
def _forward(config):
    return jax.jit(lambda params, ids: GPTNeoX(config).apply({"params": params}, ids))


def _reference_losses(workdir: pathlib.Path, vqgan: pathlib.Path
                      ) -> dict[int, tuple[float, float]]:
    """Stage 1 of the run's config on 4 devices of this one process, each step's global batch
    the two hosts' shards of it concatenated, from the same initial params."""
    cfg = rc.from_json((workdir / "config.json").read_text())
    mesh = mesh_lib.mesh_from_flag("2x2", jax.devices()[:4])
    rules = rules_for(cfg.param_sharding)
    vocab = Vocab.load(workdir / "tokenizer")
    data = run_lib.data_for(cfg, 1, workdir / "world", workdir / "codes", ("train",))
    sources = pipeline_lib.load_sources(data, pipeline_lib.flat_codes(str(workdir / "codes")))
    train_cfg = rc.stage_train(cfg, 1)
    hosts = [iter(pipeline_lib.build_pipeline(sources, vocab, data, seq_len=train_cfg.seq_len,
                                              global_batch=train_cfg.global_batch, shard_index=i,
                                              shard_count=2))
             for i in range(2)]
    params = run_lib.with_image_embeddings(cfg, None, mesh, vqgan, vocab)
    state = state_from_params(params, cfg.model, train_cfg, mesh, rules)
    step = make_train_step(cfg.model, train_cfg, mesh, len(pipeline_lib.TASKS), rules)
    sharding = batch_sharding(mesh)
    losses = {}
    for k in range(1, STEPS + 1):
        local = [next(h) for h in hosts]
        batch = {key: jax.device_put(np.concatenate([b[key] for b in local]), sharding)
                 for key in local[0]}
        state, metrics = step(state, batch)
        # What the run logs for a 1-step window.
        losses[k] = (float(metrics["loss"]), float(metrics["tokens"]))
    return losses


@pytest.fixture(scope="module")
def reference(runs):
    return _reference_losses(runs["workdir"], runs["root"] / "vqgan")


def _assert_same_losses(got: dict[int, tuple], want: dict[int, tuple]) -> None:
    assert got and set(got) <= set(want), (got, want)
    steps = sorted(got)
    np.testing.assert_allclose([got[s][0] for s in steps], [want[s][0] for s in steps],
                               rtol=2e-5, err_msg=f"per-step losses at steps {steps}")
    assert [got[s][1] for s in steps] == [want[s][1] for s in steps], "loss tokens per step"


def test_sigterm_to_one_host_stops_every_host_at_the_same_step(runs, reference):
    cut = runs["cut"]
    assert cut["code"] == 0, cut["text"][-4000:]
    stops = [re.search(r"stage 1: preempted at step (\d+)", cut[p]) for p in ("p0", "p1")]
    assert all(stops), cut["text"][-4000:]
    stop = int(stops[0][1])
    assert int(stops[1][1]) == stop and 2 <= stop < STEPS
    assert cut["checkpoints"][-1] == stop  # saved by both hosts (committed), not a save step
    losses = _losses(cut["records"])
    assert sorted(losses) == list(range(1, stop + 1))
    # 2 processes x 2 devices, each reading its own shard: the losses of 1 process on 4 devices
    # fed both shards as one global batch.
    _assert_same_losses(losses, reference)


def test_a_killed_host_stops_the_others_and_the_restart_resumes_exactly(runs, reference):
    killed, final = runs["killed"], runs["final"]
    assert killed["code"] != 0
    # Process 0 stopped by itself with an error (its next collective lost its peer, or JAX's
    # coordination service saw the heartbeats stop), not by the launcher's SIGTERM after its
    # grace period.
    assert "process 1 was killed by SIGKILL" in killed["text"]
    assert re.search(r"\[p0\] .*(Connection (reset|closed) by peer|stopped sending heartbeats"
                     r"|another task died)", killed["text"]), killed["text"][-4000:]
    assert "sending SIGTERM" not in killed["text"]
    assert killed["seconds"] < HEARTBEAT_S + 50
    _assert_same_losses(_losses(killed["records"]), reference)

    resumed_from = min(_losses(final["records"])) - 1
    assert resumed_from == killed["checkpoints"][-1] >= killed["saved"] - CHECKPOINT_EVERY
    assert sorted(_losses(final["records"])) == list(range(resumed_from + 1, STEPS + 1))
    _assert_same_losses(_losses(final["records"]), reference)


def test_only_process_0_writes_logs_and_both_write_checkpoint_shards(runs):
    workdir = runs["workdir"]
    stage = workdir / "stage1"
    records = read_jsonl(stage / "metrics.jsonl")
    per_run = [runs["cut"]["records"], runs["killed"]["records"], runs["final"]["records"]]
    assert sum(map(len, per_run)) == len(records)
    for run in per_run:  # one line per step (and one per evaluation), not one per process
        train_steps = [r["step"] for r in run if "loss" in r]
        assert len(train_steps) == len(set(train_steps))
    assert len(list((stage / "tensorboard").glob("events.out.tfevents.*"))) == 3
    assert not re.search(r"stage 1 step \d+/", runs["final"]["p1"])
    assert "samples:" not in runs["final"]["p1"]
    assert (workdir / "samples" / "grid.png").is_file()
    assert (workdir / "config.json").is_file() and (workdir / "llm" / "config.json").is_file()
    done = json.loads((stage / "DONE.json").read_text())
    assert done["step"] == STEPS
    # The conditioning gap ran as a global program on both processes.
    assert any(k.startswith("gap/") and v is not None for k, v in done.items()), done
    # Each process wrote its own shards of the train state and its own data-iterator position.
    step_dir = stage / "checkpoints" / str(STEPS)
    assert {p.name for p in (step_dir / "state").glob("ocdbt.process_*")} == {
        "ocdbt.process_0", "ocdbt.process_1"}
    assert {p.name for p in (step_dir / "data").glob("process_*")} == {
        "process_0-of-2.json", "process_1-of-2.json"}


def test_host_shards_are_disjoint_and_make_the_whole_source(runs):
    workdir = runs["workdir"]
    cfg = rc.from_json((workdir / "config.json").read_text())
    data = run_lib.data_for(cfg, 1, workdir / "world", workdir / "codes", ("train",))
    sources = pipeline_lib.load_sources(data, pipeline_lib.flat_codes(str(workdir / "codes")))
    vocab = Vocab.load(workdir / "tokenizer")
    for task, records in sources.records.items():
        ids = [[json.dumps(r, sort_keys=True, default=str) for r in records[i::2]] for i in (0, 1)]
        assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == len(records)
    batches = [next(iter(pipeline_lib.build_pipeline(
        sources, vocab, data, seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch,
        shard_index=i, shard_count=2))) for i in (0, 1)]
    assert all(b["inputs"].shape[0] == cfg.train.global_batch // 2 for b in batches)


# Runs launch scripts' `main(argv)` one after another in one process (argv lists as JSON).
_SCRIPTS = ("import json, runpy, sys\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    assert runpy.run_path(argv[0])['main'](argv[1:]) == 0, argv\n")


def test_the_workdir_serves_evaluate_generate_and_export(runs, tmp_path):
    workdir, env = runs["workdir"], {**runs["env"], "LLMCXR_CPU_DEVICES": "2"}
    # A random CXR classifier: what it scores is not under test here, and training one costs a
    # compile. At the VQ-GAN's 64 px.
    classifier = clf.ClassifierConfig(image_size=64)
    clf.save_classifier(tmp_path / "classifier", classifier, clf.init_params(classifier))
    scripts = [
        ["launch/generate.py", "--workdir", str(workdir), "--task", "report2image", "--report",
         "Moderate left pleural effusion.", "--out", str(tmp_path / "drawn")],
        ["launch/evaluate.py", "--workdir", str(workdir), "--n-test", "2", "--classifier",
         str(tmp_path / "classifier"), "--guidance", "1", "--n-language", "2",
         "--report-tokens", "8", "--n-show", "0"],
        ["launch/export.py", "--workdir", str(workdir), "--format", "serving", "--out",
         str(tmp_path / "serve1")]]
    proc = subprocess.run([sys.executable, "-c", _SCRIPTS, json.dumps(scripts)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "drawn").glob("*.png"))
    assert json.loads((workdir / "eval" / "eval.json").read_text())

    # A serving export written by 2 processes restores here with the logits of the run's LLM.
    two = Launch(["launch/export.py", "--workdir", str(workdir), "--format", "serving", "--out",
                  str(tmp_path / "serve2"), "--mesh", "2x2"], runs["env"])
    assert two.finish() == 0, two.text()[-4000:]
    mesh = mesh_lib.mesh_from_flag("1", jax.devices()[:1])
    llm = serving.load_bundle(workdir, mesh, load_vqgan=False)
    ids = np.random.default_rng(1).integers(0, llm.vocab.n_valid, (2, 12)).astype(np.int32)
    want = np.asarray(_forward(llm.model_config)(llm.params, ids))
    for out in ("serve1", "serve2"):
        bundle = serving.load_bundle(tmp_path / out, mesh, load_vqgan=False)
        assert bundle.kind == "serving" and bundle.step == STEPS
        got = np.asarray(_forward(bundle.model_config)(bundle.params, ids))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_distributed_args_from_the_environment():
    args = mesh_lib.distributed_args({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234",
                                      "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                                      "LLMCXR_HEARTBEAT_TIMEOUT_S": "7"})
    assert args == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                    "process_id": 1, "heartbeat_timeout_seconds": 7}
    assert mesh_lib.distributed_args({}) is None
    with pytest.raises(ValueError, match="go together"):
        mesh_lib.distributed_args({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"):
        mesh_lib.distributed_args({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    env = local_cluster.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 -x"},
                                    1, 2, 3, 4321, 9)
    assert env["XLA_FLAGS"] == "-x --xla_force_host_platform_device_count=3"
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4321" and env["JAX_PROCESS_ID"] == "1"
