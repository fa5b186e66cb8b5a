"""The ranks of the test pipelines.

    python pipeline_worker.py SCENARIO MODEL PARTS OUT [--lazy] [--timeout S] [--join-timeout S] [--victim R]

runs one rank (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set). Rank 0 saves what it computed to
OUT (torch.save); a rank that fails prints one JSON line {"error", "type", "at": time.time()} and
exits with status 3.

    python pipeline_worker.py --zygote

imports torch once and then, for each launch request read from stdin (one JSON line), forks the
requested ranks and answers their exit codes. Three fresh interpreters importing torch at once
take ~6 s on a loaded 2-core machine; a fork takes milliseconds. It is safe because the zygote
has no threads when it forks (torch starts its thread pools lazily, in the children).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback

import torch

from llm_pipeline import Pipeline, PipelineError, StageError, generate, load_stage
from llm_sampler import CachedForward, pad_left, score


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of 5 prompts (5, 9) and its mask."""
    g = torch.Generator().manual_seed(3)
    lengths = [9, 4, 7, 9, 2]
    prompts = [torch.randint(1, 384, (n,), generator=g).tolist() for n in lengths]
    return pad_left(prompts, pad_token_id=0)


def equivalence(stage, out: str) -> None:
    ids, mask = inputs()
    res: dict[str, object] = {"ids": ids, "mask": mask}
    with Pipeline(stage, micro_batches=1) as pipe:
        # un-batched, uneven micro-batches (3 + 2 rows), one row each
        for m in (1, 2, 5):
            pipe.micro_batches = m
            res[f"logits_m{m}"] = pipe(ids, attention_mask=mask)
            res[f"greedy_m{m}"] = generate(pipe, ids, 10, attention_mask=mask, temperature=0)
        pipe.micro_batches = 2
        res["sampled"] = generate(
            pipe,
            ids,
            10,
            attention_mask=mask,
            temperature=1.0,
            top_p=0.9,
            generator=torch.Generator().manual_seed(5),
        )
        # scoring crops the caches back to the prompt; 20-token continuations exceed a
        # sliding-window ring's rollback room, so every stage's cache is rebuilt by a replay
        conts = [list(range(10, 30)), [7, 8], list(range(40, 60))]
        res["scores"] = [s.token_logprobs for s in score(CachedForward(pipe), ids[0].tolist(), conts)]
        # a failure on rank 0's own part (token id >= vocab in micro-batch 1) and one
        # injected on rank 1: both raised here, and the pipeline keeps working
        bad = ids.clone()
        bad[4, -1] = 10_000
        try:
            pipe(bad)
        except ValueError as e:
            res["own_error"] = str(e)
        try:
            pipe(ids[:, :3].repeat(1, 5)[:, :13])  # 13 positions: rank 1 fails on them
        except StageError as e:
            res["stage_error"] = str(e)
        res["after_errors"] = pipe(ids, attention_mask=mask)
    torch.save(res, out)


def masks(stage, out: str) -> None:
    """The same padded batch with its mask in other dtypes and shapes; bad masks refused up front."""
    ids, mask = inputs()
    res: dict[str, object] = {"ids": ids, "mask": mask}
    with Pipeline(stage, micro_batches=2) as pipe:
        for dtype in (torch.bool, torch.int32, torch.int64, torch.float32, torch.float64, torch.uint8):
            res[str(dtype)] = pipe(ids, attention_mask=mask.to(dtype))
            res[f"greedy {dtype}"] = generate(pipe, ids, 4, attention_mask=mask.to(dtype), temperature=0)
        # a mask covering more positions than the ids (past + new): its last T columns count
        res["longer"] = pipe(ids[:, 3:], attention_mask=mask.to(torch.int32))
        res["row"] = pipe(ids[1:2], attention_mask=mask[1].bool())  # (T,) for one row
        res["errors"] = []
        for bad in (mask[:, :4], mask[:3], mask * 0.5, mask[..., None]):
            try:
                pipe(ids, attention_mask=bad)
            except ValueError as e:
                res["errors"].append(str(e))
        res["after"] = pipe(ids, attention_mask=mask)
    torch.save(res, out)


def many(stage, out: str, victim: int) -> None:
    """B = M = 96 micro-batches of one row each in one forward, then a few decode steps."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 384, (96, 5), generator=g)
    if victim >= 0 and stage.rank == victim:  # freezes on a forward in the middle of the 96
        calls, run = [0], stage.run

        def run_then_freeze(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 40:
                os.kill(os.getpid(), signal.SIGSTOP)
            return run(*args, **kwargs)

        stage.run = run_then_freeze
    if stage.rank == 0:
        with Pipeline(stage, micro_batches=96) as pipe:
            res = {"ids": ids, "logits": pipe(ids), "greedy": generate(pipe, ids, 3, temperature=0)}
        torch.save(res, out)
    else:
        stage.serve()


def kill_or_hang(stage, scenario: str, victim: int, out: str) -> None:
    """The victim dies (SIGKILL) or freezes (SIGSTOP) on its 4th forward: during decoding."""
    if stage.rank == victim:
        calls = [0]
        run = stage.run

        def run_then_fail(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 4:
                with open(out + ".victim", "w") as f:
                    f.write(str(time.time()))
                sig = signal.SIGKILL if scenario == "kill" else signal.SIGSTOP
                os.kill(os.getpid(), sig)
            return run(*args, **kwargs)

        stage.run = run_then_fail
    if stage.rank == 0:
        ids, mask = inputs()
        with Pipeline(stage) as pipe:
            generate(pipe, ids, 50, attention_mask=mask, temperature=0)
    else:
        stage.serve()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("model")
    p.add_argument("parts")
    p.add_argument("out")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--join-timeout", type=float, default=30.0)
    p.add_argument("--lazy", action="store_true")
    p.add_argument("--victim", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.scenario == "slowload" and int(os.environ["RANK"]) == args.victim:
        import llm_pipeline.stage

        def never_loads(*a, **kw):
            time.sleep(600)

        llm_pipeline.stage.load_part = never_loads  # the victim joins but never loads its part
    try:
        stage = load_stage(
            args.model,
            args.parts,
            lazy=args.lazy,
            timeout=args.timeout,
            join_timeout=args.join_timeout,
        )
        if args.scenario == "equivalence":
            if stage.rank == 1:
                run = stage.run

                def fail_on_13(x, *a, **kw):
                    if x.shape[1] == 13:
                        raise ValueError("injected failure")
                    return run(x, *a, **kw)

                stage.run = fail_on_13
            equivalence(stage, args.out) if stage.rank == 0 else stage.serve()
        elif args.scenario == "masks":
            masks(stage, args.out) if stage.rank == 0 else stage.serve()
        elif args.scenario == "many":
            many(stage, args.out, args.victim)
        else:
            kill_or_hang(stage, args.scenario, args.victim, args.out)
        stage.close()
    except (PipelineError, ValueError) as e:
        print(json.dumps({"error": str(e), "type": type(e).__name__, "at": time.time()}))
        sys.exit(3)


def zygote() -> None:
    """Serve launch requests: {"ranks", "args": {rank: argv}, "env", "logs", "stuck", "wait"}."""
    assert threading.active_count() == 1, "forking is only safe without threads"
    for line in sys.stdin:
        req = json.loads(line)
        pids = {}
        for r in req["ranks"]:
            pid = os.fork()
            if pid == 0:  # the rank
                os.environ.update(req["env"], RANK=str(r), LOCAL_RANK=str(r))
                for fd, suffix in ((1, "out"), (2, "err")):
                    os.dup2(
                        os.open(
                            f"{req['logs']}.{r}.{suffix}",
                            os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                        ),
                        fd,
                    )
                code = 0
                try:
                    main(req["args"][str(r)])
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                except BaseException:  # noqa: BLE001 - reported as the rank's exit status
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            pids[pid] = r
        print(json.dumps(reap(pids, set(req["stuck"]), req["wait"])), flush=True)


def reap(pids: dict[int, int], stuck: set[int], wait: float) -> dict[str, object]:
    """{"codes": exit code by rank, "killed": ranks killed here}: those in `stuck` once the others
    have ended, and any still running after `wait` seconds."""
    codes: dict[int, int] = {}
    killed: list[int] = []
    deadline = time.time() + wait
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            codes[pids[pid]] = os.waitstatus_to_exitcode(status)
            continue
        running = set(pids.values()) - set(codes)
        if running <= stuck or time.time() > deadline:
            for p, r in pids.items():
                if r in running:
                    os.kill(p, signal.SIGKILL)
                    codes[r] = os.waitstatus_to_exitcode(os.waitpid(p, 0)[1])
                    killed.append(r)
        time.sleep(0.02)
    return {"codes": codes, "killed": killed}


if __name__ == "__main__":
    zygote() if sys.argv[1:] == ["--zygote"] else main()
