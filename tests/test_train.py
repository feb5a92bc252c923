"""Training and evaluation: LR schedule, atomic weights-only checkpoints, exact resume, metrics, baselines."""

import argparse
import io
import math

import numpy as np
import pytest
import torch

from onerec_fast.train.baselines import SASRecConfig, popularity_topk, sasrec_topk, train_rows, train_sasrec
from onerec_fast.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from onerec_fast.train.evaluate import evaluate_all, evaluate_onerec, format_table, rank_metrics
from onerec_fast.train.pretrain import EpochBatchSampler, TrainConfig, Trainer, lr_at, param_groups
from onerec_fast.train.progress import ProgressBar
from tests.model_world import batch_of, make_model, one_thread, world  # noqa: F401 (fixtures)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_param_groups_and_the_embedding_tables_decay():
    """Matrices decay, 1-D parameters never; ``embedding_weight_decay`` moves the nn.Embedding tables into a group
    of their own (without it: two groups, the layout saved checkpoints hold); one AdamW step on zero gradients
    then shrinks exactly the groups that decay."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    emb, lin, norm = m[0].weight, m[1].weight, m[2].weight
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    two = param_groups(m, 0.05)
    assert [g["weight_decay"] for g in two] == [0.05, 0.0]
    assert ids(two[0]) == {id(emb), id(lin)} and ids(two[1]) == {id(m[1].bias), id(norm), id(m[2].bias)}
    three = param_groups(m, 0.05, 0.0)
    assert [g["weight_decay"] for g in three] == [0.05, 0.0, 0.0] and ids(three[0]) == {id(lin)}
    assert ids(three[2]) == {id(emb)}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(three, lr=0.1)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(m.named_parameters())
    assert torch.allclose(after["1.weight"], before["1.weight"] * (1 - 0.1 * 0.05))
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["2.weight"], before["2.weight"])
    with pytest.raises(ValueError, match="embedding_weight_decay must be >= 0"):
        TrainConfig(embedding_weight_decay=-0.1)


def test_time_budget_anneals_the_schedule_before_it_stops(world, monkeypatch):
    """A budget that ends the run long before cfg.steps moves the cosine's end to the projected last step, so
    the run still anneals: the lr of the last logged window is near min_lr, not still at its peak."""
    import onerec_fast.train.pretrain as pretrain

    clock = iter(np.arange(0.0, 1e6, 0.05))  # every host-time read advances the fake clock 50 ms
    monkeypatch.setattr(pretrain.time, "perf_counter", lambda: float(next(clock)))
    _, codes, ds, _ = world
    cfg = TrainConfig(steps=100_000, batch_size=8, lr=1.0, warmup_steps=2, log_every=2, min_lr_ratio=0.1,
                      time_budget_s=4.0)
    trainer = Trainer(make_model(ds, codes), ds, cfg, show_progress=False)
    trainer.train()
    assert 10 < trainer.step < 100, trainer.step
    assert trainer.horizon <= trainer.step + 4
    assert trainer.metrics[-1]["lr"] < 0.3 and max(r["lr"] for r in trainer.metrics) > 0.8
    assert lr_at(50, cfg, horizon=98) == pytest.approx(lr_at(50, TrainConfig(steps=98, lr=1.0, warmup_steps=2)))


def test_epoch_batch_sampler_resumes_mid_epoch():
    full = EpochBatchSampler(10, 3, seed=4)
    it = iter(full)
    first = [next(it) for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    assert sorted(sum(first[:3], [])) != list(range(10)) or len(sum(first[:3], [])) == 9
    assert len(set(sum(first[:3], []))) == 9  # no repeats inside an epoch
    rest = iter(EpochBatchSampler(10, 3, seed=4, start=4))
    assert [next(rest) for _ in range(3)] == first[4:]
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatchSampler(2, 3)


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    state = {"w": torch.randn(3, 4), "nested": {"step": 7, "name": "x", "betas": (0.9, 0.95)}, "rng": rng_state()}
    path = save_checkpoint(tmp_path / "ck.pt", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temporary file left behind
    back = torch.load(path, weights_only=True)
    assert torch.equal(back["w"], state["w"]) and back["nested"] == state["nested"]
    a = (np.random.rand(), torch.rand(2), __import__("random").random())
    set_rng_state(load_checkpoint(path)["rng"])
    b = (np.random.rand(), torch.rand(2), __import__("random").random())
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    _, codes, ds, _ = world
    cfg = TrainConfig(steps=5, batch_size=4, lr=3e-3, warmup_steps=2, log_every=2)
    full = Trainer(make_model(ds, codes, seed=0), ds, cfg, show_progress=False).train()
    first = Trainer(make_model(ds, codes, seed=0), ds, cfg, out_dir=tmp_path, show_progress=False)
    first.train(steps=2)
    resumed = Trainer(make_model(ds, codes, seed=99), ds, cfg, show_progress=False)  # other init: all restored
    resumed.resume(tmp_path / "checkpoint.pt")
    assert resumed.step == 2
    rest = resumed.train()
    assert [s for s, _ in rest] == [3, 4, 5]
    assert [loss for _, loss in rest] == [loss for _, loss in full[2:]]  # bit-for-bit
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.csv").exists()
    other = Trainer(make_model(ds, codes), ds, TrainConfig(steps=8, batch_size=8), show_progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        other.resume(tmp_path / "checkpoint.pt")


def test_training_reduces_loss(world):
    _, codes, ds, _ = world
    model = make_model(ds, codes)
    fixed = batch_of(ds, range(0, len(ds), max(1, len(ds) // 32)))
    with torch.no_grad():
        before = float(model.eval()(fixed))
    trainer = Trainer(model, ds, TrainConfig(steps=12, batch_size=16, lr=3e-3, warmup_steps=2, log_every=6),
                      show_progress=False)
    trainer.train()
    with torch.no_grad():
        after = float(model.eval()(fixed))
    assert after < before - 0.02, (before, after)
    assert all(math.isfinite(r["mfu"]) and r["tokens_per_s"] > 0 for r in trainer.metrics)


def test_rank_metrics():
    top = torch.tensor([[3, 1, 2], [5, 6, 7], [9, 8, -1]])
    m = rank_metrics(top, torch.tensor([1, 4, 9]), ks=(1, 3))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="ranked items"):
        rank_metrics(top, torch.tensor([1, 4, 9]), ks=(5,))


def test_split_and_baselines(world):
    log, _, _, test = world
    keep = train_rows(log)
    off = log.user_offsets()
    assert not keep[off[1:] - 1].any() and not keep[off[1:] - 2].any()  # test and validation rows held out
    assert keep.sum() == len(log) - 2 * log.num_users
    pop = popularity_topk(log, 5)
    counts = np.bincount(log.item[keep], minlength=log.num_items)
    assert counts[pop[0]] == counts.max() and len(set(pop.tolist())) == 5
    model = train_sasrec(log, SASRecConfig(epochs=2, d_model=16, max_len=10), show_progress=False)
    top, targets = sasrec_topk(model, log, 10)
    assert top.shape == (log.num_users, 10)
    assert torch.equal(targets, torch.as_tensor(log.item[off[1:] - 1]))


def test_evaluate_table(world):
    log, codes, _, test = world
    model = make_model(test, codes)
    res = evaluate_onerec(model, test, beam_size=16, batch_size=8, show_progress=False)
    assert res["legality"] == 1.0 and 0 <= res["recall@10"] <= 1 and res["ndcg@10"] <= res["recall@10"]
    allres = evaluate_all(model, test, log, beam_size=16, batch_size=8,
                          sasrec_cfg=SASRecConfig(epochs=1, d_model=16, max_len=10), show_progress=False)
    table = format_table(allres)
    assert set(allres) == {"OneRec", "Popularity", "SASRec"}
    assert "recall@10" in table and "SASRec" in table


def test_progress_bar_lines():
    out = io.StringIO()
    bar = ProgressBar(4, "x", stream=out, every=2)
    for _ in range(4):
        bar.update(1, loss=1.5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("x [") and "4/4" in lines[-1] and "loss 1.5" in lines[-1]


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


_SMALL_WORLD = [x for kv in ("num_users=60", "num_items=120", "median_history=25", "max_history=60",
                             "heavy_user_frac=0") for x in ("--synthetic", kv)]


@pytest.mark.parametrize("flags, window", [(["--transition-window", "0"], 0), (["--eval-every", "2"], 3),
                                           (["--preset", "tiny"], 0), (["--no-transition-prior"], 3),
                                           (["--no-transition-prior", "--no-transition-mixture"], 3)],
                         ids=["off", "recipe", "no-node-heads", "no-prior", "no-prior-no-mixture"])
def test_cli_train_evaluate_generate(tmp_path, capsys, flags, window):
    """train, resume, evaluate and generate through the CLI: with transition biases off, at the small recipe's
    default (window 3, the count prior and the mixture: the checkpoint carries their keys, counts and trained
    weights to evaluate and generate; with validation, best.pt carries the mixture weight chosen on it), with
    the prior or both turned off, and off by default for a preset without node heads."""
    from onerec_fast.train import cli_evaluate, cli_generate, cli_train

    argv = ["--steps", "4", "--batch-size", "8", "--warmup", "2", "--log-every", "2", "--ckpt-every", "2",
            "--out", str(tmp_path), *_SMALL_WORLD, *flags]
    assert cli_train.run(_parse(cli_train, argv)) == 0
    ck = tmp_path / "checkpoint.pt"
    assert torch.load(ck, weights_only=True)["schedule"]["step"] == 4
    assert cli_train.run(_parse(cli_train, [*argv[:1], "6", *argv[2:], "--resume"])) == 0  # 2 more steps
    assert torch.load(ck, weights_only=True)["schedule"]["step"] == 6
    assert cli_evaluate.run(_parse(cli_evaluate, ["--checkpoint", str(ck), "--beam", "16", "--sasrec-epochs", "1"])) == 0
    assert cli_generate.run(_parse(cli_generate, ["--checkpoint", str(ck), "--users", "0", "1", "--top-k", "3",
                                                  "--beam", "8"])) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "recall@10" in out and "SASRec" in out
    assert "user 1:" in out and "true watch ratio" in out
    saved = torch.load(ck, weights_only=True)
    state = saved["model"]
    assert saved["model_config"]["transition_window"] == window
    assert ("decoder.transition_keys" in state) == bool(window)
    if window:
        assert state["decoder.transition_keys"].numel() == state["decoder.transition_bias"].numel() > 0
        assert bool((state["decoder.transition_bias"] != 0).any())  # trained
        prior = "--no-transition-prior" not in flags
        assert saved["model_config"]["transition_prior"] == prior
        mixture = "--no-transition-mixture" not in flags
        assert saved["model_config"]["transition_mixture"] == mixture
        assert ("decoder.transition_counts" in state) == (prior or mixture)
        assert ("decoder.transition_mix" in state) == mixture
        if prior:
            assert bool((state["decoder.transition_weights.0"] != 0).any())
        if "--eval-every" in flags:
            best = torch.load(tmp_path / "best.pt", weights_only=True)
            chosen = best["selection"]["transition_mix"]
            assert chosen in cli_train.MIXTURE_WEIGHTS
            assert float(best["model"]["decoder.transition_mix"]) == chosen
            assert f"transition mixture: chain weight {chosen} in" in out


def test_demo_small(tmp_path, capsys):
    from onerec_fast.train import cli_demo

    assert cli_demo.run(_parse(cli_demo, ["--small", "--out", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("[5/5]", "OneRec", "Popularity", "SASRec", "demo finished"))
