"""Training under torch.distributed on CPU (Gloo, 2 processes): DDP, FSDP2 and DDP with expert parallelism match
one process with the same global batch, DCP checkpoints move between world sizes (and in and out of expert
parallelism), only rank 0 writes output, MoELayer and QFormer work
inside DDP / FSDP2 (and torch.compile, opt-in), the ECPO loop keeps its ranks identical, and both CLIs run with
torchrun's environment. With 2 GPUs the pretraining scenarios also run over NCCL.

The two ranks start once (``_rank_main``), run every distributed scenario and save what they saw; the tests
compare that with single-process runs in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from onerec_fast.distributed import ExpertParallelMoE
from onerec_fast.train.checkpoint import load_checkpoint
from onerec_fast.train.parallel import DistInfo, ParallelModel, init_distributed, shard_range, shutdown_distributed
from onerec_fast.train.pretrain import EpochBatchSampler, TrainConfig, Trainer
from tests.model_world import make_codes, make_dataset, make_log, make_model, one_thread  # noqa: F401 (fixture)

WORLD = 2
# (wrapper, modules compiled). Compiling (aot_eager) costs 5-10 s per case on 2 cores: opt in with
# ONEREC_FAST_TEST_COMPILE=1.
MODULE_CASES = tuple((mode, compiled) for mode in ("ddp", "fsdp")
                     for compiled in ((False, True) if os.environ.get("ONEREC_FAST_TEST_COMPILE") == "1" else (False,)))
STEPS, BATCH, SAVE_AT = 4, 8, 2
# the pretraining runs on two ranks: DDP, FSDP2, and DDP with the decoder's 4 experts split 2 + 2 ("ep")
PRETRAIN_MODES = ("ddp", "fsdp", "ep")
# fp32 on CPU: the ranks' gradients are averaged in another order than one process sums them
ATOL = 2e-5


def _cfg(**kw) -> TrainConfig:
    # amp off: fp32 on GPUs too, so that one process and two ranks compare closely (ignored on CPU)
    return TrainConfig(steps=STEPS, batch_size=BATCH, lr=3e-3, warmup_steps=2, log_every=1, amp=False, **kw)


def _mode_cfg(mode: str) -> TrainConfig:
    """The config of a run of ``PRETRAIN_MODES``."""
    return _cfg(parallel="ddp", expert_parallel=True) if mode == "ep" else _cfg(parallel=mode)


def _world():
    log = make_log()
    codes = make_codes(log.num_items)
    return codes, make_dataset(log, codes, "train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_state(sd: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


# --------------------------------------------------------------------------------------------- the two ranks
def _rank_main(rank: int, port: int, cli_port: int, tmp: str) -> None:
    # torchrun's environment: init_distributed must find it (Gloo on CPU)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with contextlib.suppress(ImportError):  # the tokenizer's faiss has its own OpenMP: no pool from the parent
        import faiss

        faiss.omp_set_num_threads(1)
    assert init_distributed("cpu") == DistInfo(rank, WORLD) and dist.get_backend() == "gloo"
    tmp = Path(tmp)
    out = {"codes": _codes_on_rank(rank),
           "pretrain": {mode: _pretrain_on_rank(mode, tmp) for mode in PRETRAIN_MODES},
           "ep": _expert_parallel_on_rank(tmp),
           "modules": _modules_on_rank(), "rl": _rl_on_rank(tmp), "cli": _cli_on_rank(tmp)}
    assert not dist.is_initialized()  # the CLI ended the process group init_distributed started
    os.environ["MASTER_PORT"] = str(cli_port)  # the rl CLI starts its own (a new store: another port)
    out["rl_cli"] = _rl_cli_on_rank(tmp)
    torch.save(out, tmp / f"rank{rank}.pt")


def _codes_on_rank(rank: int) -> dict:
    """The CLI's guard against ranks tokenizing differently: rank 1's (swapped) codes give way to rank 0's."""
    from onerec_fast.data import BatchConfig
    from onerec_fast.train.cli_train import same_codes_as_rank0
    from onerec_fast.train.pipeline import Prepared, datasets_for

    log = make_log()
    codes = make_codes(log.num_items)
    if rank == 1:
        codes = codes.flip(0)
    emb, bc = torch.zeros(log.num_items, 4), BatchConfig(short_len=5, positive_len=8, lifelong_len=64)
    prepared = Prepared(log, None, emb, codes, bc, datasets_for(log, codes, emb, bc, ("train",)))
    got = same_codes_as_rank0(prepared)
    return {"codes": got.item_codes, "target_codes": got.datasets["train"][0]["target_codes"],
            "same_object": got is prepared}


def _pretrain_on_rank(mode: str, tmp: Path, device: str = "cpu") -> dict:
    codes, ds = _world()
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        trainer = Trainer(make_model(ds, codes, seed=0), ds, _mode_cfg(mode), device, out_dir=tmp / mode)
        trainer.train(SAVE_AT)
        trainer.save(tmp / mode / "step2.dcp")
        history = trainer.train()  # also saves checkpoint.dcp at the end
        trainer.save()  # again: the link moves to a new version and the first is deleted
        # the single-process checkpoint format resumes on two ranks
        from_pt = Trainer(make_model(ds, codes, seed=5), ds, _mode_cfg(mode), device, show_progress=False)
        from_pt.resume(tmp / "single_step2.pt")
        rest = from_pt.train()
        # and DDP's DCP checkpoint resumes on two ranks (under FSDP2: resharded on load; with expert
        # parallelism: each rank reads its experts' rows)
        from_dcp = Trainer(make_model(ds, codes, seed=6), ds, _mode_cfg(mode), device, show_progress=False)
        from_dcp.resume(tmp / "ddp" / "step2.dcp")
        rest_dcp = from_dcp.train()
    bias = [m.expert_bias.to("cpu", copy=True) for m in trainer.model.modules() if hasattr(m, "expert_bias")]
    # a checkpoint before the first step: the optimizer state DCP needs is made up, then dropped again
    fresh = Trainer(make_model(ds, codes, seed=0), ds, _mode_cfg(mode), device, show_progress=False)
    fresh.save(tmp / mode / "step0.dcp")
    replica = trainer.parallel.gathered()  # with whole parameters (and full MoELayers), for generation
    return {"history": history, "state": _cpu_state(trainer.parallel.full_state_dict()), "bias": bias,
            "expert_parallel_layers": sum(isinstance(m, ExpertParallelMoE) for m in trainer.model.modules()),
            "replica_state": _cpu_state(replica.state_dict()),
            "replica_moe": sorted({type(m).__name__ for m in replica.modules() if hasattr(m, "expert_bias")}),
            "grad_norms": [r["grad_norm"] for r in trainer.metrics], "from_pt": rest, "from_dcp": rest_dcp, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
            "fresh_optimizer_empty": not fresh.opt.state, "first_users": next(iter(fresh._loader())).user.tolist()}


def _expert_parallel_on_rank(tmp: Path) -> dict:
    """The expert-parallel run's step-2 DCP checkpoint resumed on two ranks without and with expert
    parallelism, and what expert parallelism refuses (the messages)."""
    codes, ds = _world()
    out = {}
    for mode in ("ddp", "ep"):
        resumed = Trainer(make_model(ds, codes, seed=7), ds, _mode_cfg(mode), show_progress=False)
        resumed.resume(tmp / "ep" / "step2.dcp")
        out[mode] = resumed.train()
    errors = {}
    for case, overrides, parallel in (("odd_experts", {"dec_moe_experts": 3}, "ddp"),
                                      ("dense", {"dec_moe_experts": 0}, "ddp"), ("fsdp", {}, "fsdp")):
        with pytest.raises(ValueError) as e:
            ParallelModel(make_model(ds, codes, **overrides), "cpu", parallel, expert_parallel=True)
        errors[case] = str(e.value)
    return {"resumed": out, "errors": errors}


def _modules_on_rank() -> dict:
    """MoELayer and QFormer inside DDP and FSDP2 (``MODULE_CASES``): this rank's gradients after one backward
    on its half of a batch vs. one process on the whole batch (computed here too)."""
    from onerec_fast.modules import MoELayer, QFormer

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = MoELayer(16, 24, num_experts=4, top_k=2, router="sigmoid", backend="reference")
            self.qformer = QFormer(16, num_queries=3, num_blocks=1, num_heads=2, d_kv=8, d_ff=32,
                                   backend="reference")

        def forward(self, x, values, offsets):  # x [B, 5, 16], jagged values [total, 8] -> scalar
            return (self.moe(x).square().mean() + self.qformer(values, offsets=offsets, max_len=5).square().mean())

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 16, generator=g)
    lens = torch.tensor([3, 0, 5, 2])
    values = torch.randn(int(lens.sum()), 8, generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()])
    rank = dist.get_rank()
    lo, hi = shard_range(4, rank, WORLD)
    local = (x[lo:hi], values[offsets[lo]:offsets[hi]], offsets[lo:hi + 1] - offsets[lo])

    def loss_of(model, *a):
        return model(*a)

    def grads(model, *a):
        model(*a).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    torch.manual_seed(0)
    reference = grads(Pair(), x, values, offsets)
    res = {}
    for mode, compiled in MODULE_CASES:
        torch.manual_seed(0)
        pair = Pair()
        units = [pair.moe, pair.qformer] if mode == "fsdp" else None
        if compiled:  # compiled inside the wrapper (aot_eager: no C++ toolchain needed)
            pair.moe.compile(backend="aot_eager")
            pair.qformer.compile(backend="aot_eager")
        par = ParallelModel(pair, "cpu", mode, fsdp_units=units)
        par(loss_of, *local).backward()
        got = {}
        for n, p in pair.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            got[n] = float((grad - reference[n]).abs().max())
        res[(mode, compiled)] = got
    return res


def _rl_on_rank(tmp: Path) -> dict:
    """Three ECPO steps on two ranks under DDP and under FSDP2 (generation from the gathered replica), with
    an evaluation on rank 0; the DDP run is saved."""
    from onerec_fast.rl import TableReward
    from onerec_fast.rl.loop import ECPOTrainer, evaluate_policy
    from tests.test_rl import _tiny_policy, _tiny_world

    ds, codes, pref = _tiny_world()

    def eval_fn(m):
        return evaluate_policy(m, ds, TableReward(pref), indices=range(8), group_size=4, seed=1)

    res = {}
    for mode in ("ddp", "fsdp"):
        trainer = ECPOTrainer(_tiny_policy(ds, codes), ds, TableReward(pref), _rl_cfg(parallel=mode),
                              eval_fn=eval_fn, show_progress=False)
        metrics = trainer.train()
        if mode == "ddp":
            trainer.save(tmp / "rl.dcp")
        bias = [m.expert_bias.clone() for m in trainer.model.modules() if hasattr(m, "expert_bias")]
        res[mode] = {"metrics": metrics, "state": _cpu_state(trainer.parallel.full_state_dict()), "bias": bias}
    return res


def _rl_cfg(**kw):
    from onerec_fast.rl.loop import RLConfig

    return RLConfig(steps=3, users_per_round=8, group_size=4, lr=1e-3, seed=0, **kw)


def _gpu_rank_main(rank: int, port: int, tmp: str) -> None:
    """The pretraining scenarios on two GPUs over NCCL (``cuda:LOCAL_RANK``)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")  # NVLink multicast stays off
    assert init_distributed("cuda") == DistInfo(rank, WORLD) and dist.get_backend() == "nccl"
    try:
        out = {mode: _pretrain_on_rank(mode, Path(tmp), "cuda") for mode in PRETRAIN_MODES}
    finally:
        shutdown_distributed()
    torch.save(out, Path(tmp) / f"rank{rank}.pt")


def _run_cli(module, argv: list[str]) -> dict:
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = module.run(args)
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


# a small synthetic world for the CLI runs
_SYNTHETIC = [x for kv in ("num_users=40", "num_items=64", "median_history=20", "max_history=40", "heavy_user_frac=0")
              for x in ("--synthetic", kv)]


def _cli_on_rank(tmp: Path) -> dict:
    from onerec_fast.train import cli_train

    return _run_cli(cli_train, [
        "--device", "cpu", "--parallel", "fsdp", "--steps", "2", "--batch-size", "8", "--warmup", "1",
        "--log-every", "1", "--ckpt-every", "0", "--out", str(tmp / "cli"), *_SYNTHETIC])


def _rl_cli_on_rank(tmp: Path) -> dict:
    from onerec_fast.rl import cli

    return _run_cli(cli, [
        "--checkpoint", str(tmp / "cli" / "checkpoint.dcp"), "--out", str(tmp / "rl_cli"), "--device", "cpu",
        "--rsft-steps", "1", "--batch-size", "8", "--steps", "2", "--users-per-round", "4", "--group-size", "4",
        "--pscore-epochs", "1", "--eval-users", "8"])


# --------------------------------------------------------------------------------------------- fixtures
def _single_process_reference(tmp: Path, device: str = "cpu") -> dict:
    """4 steps in one process (a .pt checkpoint at step 2): losses, final state, expert biases, first batch."""
    codes, ds = _world()
    ref = Trainer(make_model(ds, codes, seed=0), ds, _cfg(), device, show_progress=False)
    first_users = next(iter(ref._loader())).user.tolist()
    ref.train(SAVE_AT)
    ref.save(tmp / "single_step2.pt")
    history = ref.train()
    return {"tmp": tmp, "history": history, "first_users": first_users, "state": _cpu_state(ref.model.state_dict()),
            "grad_norms": [r["grad_norm"] for r in ref.metrics],
            "bias": [m.expert_bias.to("cpu", copy=True) for m in ref.model.modules() if hasattr(m, "expert_bias")]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process reference and the two ranks' results."""
    tmp = tmp_path_factory.mktemp("dist")
    ref = _single_process_reference(tmp)
    # fork where there is no CUDA: the ranks start without re-importing torch (many seconds on a 2-core CI
    # machine), and no process group exists here; a forked child cannot use CUDA once its parent touched it
    # (the checkpoints' RNG states read it), so spawn on GPU machines
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_rank_main, args=(_free_port(), _free_port(), str(tmp)), nprocs=WORLD, join=True,
                       start_method=method)
    return {**ref, "ranks": [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]}


def _close_losses(a, b, atol: float = ATOL):
    assert [s for s, _ in a] == [s for s, _ in b]
    assert all(abs(x - y) <= atol * max(1.0, abs(y)) for (_, x), (_, y) in zip(a, b)), (a, b)


def _close_states(a: dict, b: dict, atol: float = ATOL):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
        else:
            assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------- tests
def test_sampler_shards_partition_the_global_batch():
    full = iter(EpochBatchSampler(30, 8, seed=3, start=2))
    ranks = [iter(EpochBatchSampler(30, 8, seed=3, start=2, rank=r, world_size=4)) for r in range(4)]
    for _ in range(6):  # crosses an epoch boundary (3 batches per epoch)
        assert sum((next(r) for r in ranks), []) == next(full)
    with pytest.raises(ValueError, match="multiple of the world size"):
        EpochBatchSampler(30, 6, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(30, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(parallel="zero3")


@pytest.mark.parametrize("mode", PRETRAIN_MODES)
def test_two_ranks_match_one_process(runs, mode):
    for rank in runs["ranks"]:
        got = rank["pretrain"][mode]
        _close_losses(got["history"], runs["history"])
        _close_states(got["state"], runs["state"])  # with expert parallelism: the experts gathered whole
        _close_states(got["replica_state"], got["state"], atol=0)
        assert got["expert_parallel_layers"] == (2 if mode == "ep" else 0)  # the tiny decoder's 2 MoE layers
        assert got["replica_moe"] == ["MoELayer"]
        # the global gradient (averaged over ranks, not summed: AdamW and clipping would hide a sum)
        assert got["grad_norms"] == pytest.approx(runs["grad_norms"], rel=1e-4)
        # the loss-free bias saw the global load: the same on both ranks and as in one process
        assert all(torch.equal(a, b) for a, b in zip(got["bias"], runs["bias"]))
    # each rank read its half of the global batch
    halves = [r["pretrain"][mode]["first_users"] for r in runs["ranks"]]
    assert all(len(h) == BATCH // WORLD for h in halves) and sum(halves, []) == runs["first_users"]


@pytest.mark.parametrize("mode", PRETRAIN_MODES)
def test_checkpoint_of_two_ranks_resumes_in_one_process(runs, mode):
    codes, ds = _world()
    folder = runs["tmp"] / mode
    resumed = Trainer(make_model(ds, codes, seed=9), ds, _cfg(), show_progress=False)
    resumed.resume(folder / "step2.dcp")
    assert resumed.step == SAVE_AT
    _close_losses(resumed.train(), runs["history"][SAVE_AT:])
    # the final DCP checkpoint reads whole on CPU, like a single-process one (evaluate / generate / rl)
    ck = load_checkpoint(folder / "checkpoint.dcp")
    assert ck["schedule"]["step"] == STEPS and ck["data"]["batch_size"] == BATCH
    _close_states(ck["model"], runs["ranks"][0]["pretrain"][mode]["state"], atol=0)
    # saved twice: one version on disk, behind an atomically replaced link; no temporary folders left
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint.dcp"))
    assert len(names) == 2 and names[1].startswith("checkpoint.dcp.version-")
    assert (folder / "checkpoint.dcp").is_symlink() and os.readlink(folder / "checkpoint.dcp") == names[1]
    assert not any(p.name.endswith(".tmp") for p in folder.iterdir())


@pytest.mark.parametrize("mode", PRETRAIN_MODES)
def test_checkpoint_before_the_first_step_resumes_from_scratch(runs, mode):
    assert all(r["pretrain"][mode]["fresh_optimizer_empty"] for r in runs["ranks"])
    codes, ds = _world()
    resumed = Trainer(make_model(ds, codes, seed=9), ds, _cfg(), show_progress=False)
    resumed.resume(runs["tmp"] / mode / "step0.dcp")
    assert resumed.step == 0 and not resumed.opt.state  # AdamW starts at its step 1, as a fresh run
    _close_losses(resumed.train(), runs["history"])


@pytest.mark.parametrize("mode", PRETRAIN_MODES)
def test_single_process_and_dcp_checkpoints_resume_on_two_ranks(runs, mode):
    for rank in runs["ranks"]:
        _close_losses(rank["pretrain"][mode]["from_pt"], runs["history"][SAVE_AT:])
        _close_losses(rank["pretrain"][mode]["from_dcp"], runs["history"][SAVE_AT:])


def test_expert_parallel_checkpoint_resumes_on_two_ranks_with_and_without_it(runs):
    for rank in runs["ranks"]:
        for mode in ("ddp", "ep"):
            _close_losses(rank["ep"]["resumed"][mode], runs["history"][SAVE_AT:])


def test_expert_parallel_refuses_what_it_cannot_do(runs):
    errors = runs["ranks"][0]["ep"]["errors"]
    assert "num_experts" in errors["odd_experts"] and "decoder.layers.0.ffn" in errors["odd_experts"]
    assert "MoE layers" in errors["dense"] and "parallel='ddp'" in errors["fsdp"]
    with pytest.raises(ValueError, match="expert_parallel needs parallel='ddp'"):
        TrainConfig(parallel="fsdp", expert_parallel=True)
    codes, ds = _world()
    with pytest.raises(ValueError, match="more than one process"):  # one process, no torchrun
        Trainer(make_model(ds, codes), ds, _cfg(expert_parallel=True), show_progress=False)
    from onerec_fast.train import cli_train

    with pytest.raises(ValueError, match="more than one process"):  # the CLI flag reaches the Trainer
        _run_cli(cli_train, ["--device", "cpu", "--expert-parallel", "--steps", "1", "--batch-size", "8",
                             "--out", str(runs["tmp"] / "cli_ep"), *_SYNTHETIC])


def test_only_rank_zero_writes(runs):
    zero, one = (r["pretrain"]["ddp"] for r in runs["ranks"])
    assert "train [" in zero["stderr"] and "train [" not in one["stderr"] and one["stdout"] == ""
    rows = [json.loads(line) for line in (runs["tmp"] / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one writer: no duplicated rows
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in rows)


def test_moe_and_qformer_under_ddp_and_fsdp2(runs):
    for rank in runs["ranks"]:
        for (mode, compiled), diffs in rank["modules"].items():
            assert diffs and max(diffs.values()) < 1e-5, (mode, compiled, diffs)


def test_ecpo_on_two_ranks_keeps_them_identical_and_resumes_in_one_process(runs):
    from onerec_fast.rl import TableReward
    from onerec_fast.rl.loop import ECPOTrainer
    from tests.test_rl import _tiny_policy, _tiny_world

    zero, one = (r["rl"]["ddp"] for r in runs["ranks"])
    _close_states(zero["state"], one["state"], atol=0)
    assert all(torch.equal(a, b) for a, b in zip(zero["bias"], one["bias"]))
    rows = [m for m in zero["metrics"] if "reward" in m]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["users"] == 8 for r in rows)
    timeless = [[{k: v for k, v in m.items() if k != "round_s"} for m in r["metrics"] if "reward" in m]
                for r in (zero, one)]
    assert timeless[0] == timeless[1]  # the logged values are over all ranks
    evals = [m for m in zero["metrics"] if "eval_reward" in m]
    assert [m["step"] for m in evals] == [0, 3] and not any("eval_reward" in m for m in one["metrics"])
    # FSDP2 takes the same steps (same users per rank, same per-rank generators, averaged gradients)
    fsdp = runs["ranks"][0]["rl"]["fsdp"]
    _close_states(fsdp["state"], zero["state"])
    assert [m["reward"] for m in fsdp["metrics"] if "reward" in m] == [r["reward"] for r in rows]
    ds, codes, pref = _tiny_world()
    resumed = ECPOTrainer(_tiny_policy(ds, codes, seed=4), ds, TableReward(pref), _rl_cfg(), show_progress=False)
    resumed.resume(runs["tmp"] / "rl.dcp")
    assert resumed.step == 3
    _close_states(_cpu_state(resumed.model.state_dict()), zero["state"], atol=0)
    resumed.train(4)  # one rank now: its generators restart from seeds of (seed, step, rank)
    assert resumed.step == 4


def test_every_rank_trains_on_rank_zeros_codes(runs):
    zero, one = (r["codes"] for r in runs["ranks"])
    assert zero["same_object"] and not one["same_object"]  # rank 0 keeps its data; rank 1 rebuilt its datasets
    assert torch.equal(zero["codes"], one["codes"]) and (zero["target_codes"] == one["target_codes"]).all()


def test_cli_train_under_torchrun_environment(runs):
    """``onerec-fast train`` unchanged with torchrun's environment: rank-0-only prints, a DCP checkpoint, FSDP2."""
    zero, one = (r["cli"] for r in runs["ranks"])
    assert zero["code"] == one["code"] == 0
    assert zero["stdout"].count("dense parameters") == 1 and "x 2 ranks (fsdp)" in zero["stdout"]
    assert one["stdout"] == "" and "train [" not in one["stderr"]
    out = runs["tmp"] / "cli"
    assert f"checkpoint: {out / 'checkpoint.dcp'}" in zero["stdout"]
    ck = load_checkpoint(out / "checkpoint.dcp")
    assert ck["schedule"]["step"] == 2 and ck["train_config"]["parallel"] == "fsdp"
    # the other subcommands read the folder like a checkpoint.pt (one process)
    from onerec_fast.train import cli_generate

    gen = _run_cli(cli_generate, ["--checkpoint", str(out / "checkpoint.dcp"), "--users", "0", "--top-k", "3",
                                  "--beam", "8", "--device", "cpu"])
    assert gen["code"] == 0 and "user 0:" in gen["stdout"]


def test_cli_rl_under_torchrun_environment(runs):
    """``onerec-fast rl`` on the FSDP2 run's DCP checkpoint, with DDP: RSFT + P-Score + ECPO, rank 0 prints."""
    zero, one = (r["rl_cli"] for r in runs["ranks"])
    assert zero["code"] == one["code"] == 0, zero["stderr"] + one["stderr"]
    assert "true reward" in zero["stdout"] and "RSFT" in zero["stdout"] and one["stdout"] == ""
    out = runs["tmp"] / "rl_cli"
    rows = [json.loads(line) for line in (out / "rl_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    ck = load_checkpoint(out / "rl_checkpoint.dcp")
    assert ck["step"] == 2 and ck["generators"]["sample"].shape[0] == WORLD and "data" in ck["meta"]
    assert (out / "pscore.pt").exists()


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 CUDA GPUs")
def test_two_gpus_over_nccl_match_one_gpu(tmp_path):
    """The pretraining scenarios on 2 GPUs (NCCL, fp32) against one GPU: DDP, FSDP2 and DDP with expert parallelism
    losses and parameters, the .pt and DCP resumes. cuBLAS picks other kernels for half the batch, so the tolerances
    are wider."""
    ref = _single_process_reference(tmp_path, "cuda")
    mp.start_processes(_gpu_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for mode in PRETRAIN_MODES:
        for rank in ranks:
            got = rank[mode]
            _close_losses(got["history"], ref["history"], atol=1e-4)
            _close_states(got["state"], ref["state"], atol=1e-3)
            assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-3)
            _close_losses(got["from_pt"], ref["history"][SAVE_AT:], atol=1e-4)
            _close_losses(got["from_dcp"], ref["history"][SAVE_AT:], atol=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][mode]["bias"], ranks[1][mode]["bias"]))
        codes, ds = _world()
        resumed = Trainer(make_model(ds, codes, seed=9), ds, _cfg(), "cuda", show_progress=False)
        resumed.resume(tmp_path / mode / "step2.dcp")
        _close_losses(resumed.train(), ref["history"][SAVE_AT:], atol=1e-4)
