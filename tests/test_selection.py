"""What issue 14 asked of the training loop and the data: sources without engagement columns, vectorized
batches, validation model selection (best.pt, early stopping), the non-finite guard, the SASRec baseline's
early stopping and cache, recipes and popularity-ordered collision codes."""

import json
import math

import numpy as np
import pytest
import torch

from onerec_fast.data import BatchConfig, UserSequenceDataset, collate_user_batch
from onerec_fast.data.sequences import load_sequences
from onerec_fast.train import evaluate as evaluate_mod
from onerec_fast.train.baselines import SASRecConfig, train_sasrec
from onerec_fast.train.checkpoint import load_checkpoint
from onerec_fast.train.cli_common import model_from_checkpoint
from onerec_fast.train.pretrain import NonFiniteTrainingError, TrainConfig, Trainer, plot_metrics
from onerec_fast.train.recipe import SMALL_MAX_INTERACTIONS, choose_recipe, steps_for_epochs
from onerec_fast.tokenizer import disambiguate
from tests.helpers import load_script
from tests.model_world import make_model, one_thread, world  # noqa: F401 (fixtures)


def _assert_same(a, b, path="batch"):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif hasattr(a, "__dataclass_fields__"):
        for k in a.__dataclass_fields__:
            _assert_same(getattr(a, k), getattr(b, k), f"{path}.{k}")
    else:
        assert a == b, path


def _sequence_file(tmp_path, users=40, items=30, seed=0):
    """The format of ../shared/data/amazon-sports/sequences.txt: ``user item item ...`` per line."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(map(str, [u + 1, *rng.integers(1, items + 1, rng.integers(5, 15))])) for u in range(users)]
    path = tmp_path / "sequences.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sequence_file_without_engagement_trains(tmp_path):
    log = load_sequences(_sequence_file(tmp_path))
    assert log.engagement == {}
    codes = torch.tensor(np.stack([np.arange(log.num_items) // 8, np.arange(log.num_items) % 8], 1))
    ds = UserSequenceDataset(log, codes, "train", config=BatchConfig(short_len=5, positive_len=8, lifelong_len=32))
    assert len(ds) == int((np.diff(log.user_offsets()) - 3).sum())  # positions 1 .. n-3 of every user
    batch = ds.batch(np.arange(8))
    assert batch.positive.item.numel() == batch.lifelong.item.numel()  # every interaction is positive
    model = make_model(ds, codes, num_queries=2, dropout=0.1)
    trainer = Trainer(model, ds, TrainConfig(steps=3, batch_size=8, warmup_steps=1), show_progress=False)
    assert all(math.isfinite(v) for _, v in trainer.train())


@pytest.mark.parametrize("lifelong_len", [64, 12])  # 12: some histories take the compression path
def test_vectorized_batch_equals_collate(world, lifelong_len):
    log, codes, _, _ = world
    emb = torch.randn(log.num_items, 6, generator=torch.Generator().manual_seed(0))
    for split in ("train", "valid", "test"):
        ds = UserSequenceDataset(log, codes, split, item_emb=emb,
                                 config=BatchConfig(short_len=5, positive_len=8, lifelong_len=lifelong_len))
        idx = np.random.default_rng(1).permutation(len(ds))[:11]
        _assert_same(ds.batch(idx), collate_user_batch([ds[i] for i in idx]))
    with pytest.raises(ValueError, match="non-empty"):
        ds.batch([])


def _scripted_eval(values):
    """An eval_fn returning ``values`` in turn (the validation NDCG@10 of each evaluation)."""
    it = iter(values)

    def eval_fn(model):
        v = next(it)
        return {"recall@10": 2 * v, "ndcg@10": v}

    return eval_fn


def test_best_checkpoint_and_early_stopping(world, tmp_path):
    _, codes, ds, _ = world
    cfg = TrainConfig(steps=40, batch_size=4, warmup_steps=1, log_every=2, eval_every=2, patience=2)
    trainer = Trainer(make_model(ds, codes), ds, cfg, out_dir=tmp_path, show_progress=False,
                      eval_fn=_scripted_eval([0.1, 0.3, 0.2, 0.25, 0.9]))
    trainer.train()
    assert trainer.step == 8  # evaluations at 2, 4 (best), 6, 8: two without improvement
    assert trainer.selection == {"best": 0.3, "best_step": 4, "since_best": 2}
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["schedule"]["step"] == 4 and best["selection"]["best"] == 0.3
    assert model_from_checkpoint(best) is not None  # evaluate can load it
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "valid_ndcg@10" in r] == [2, 4, 6, 8]
    assert "valid" not in (tmp_path / "metrics.csv").read_text()  # the CSV holds the training windows
    assert "plot" in plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    # a resumed run knows it stopped, and keeps the selection
    again = Trainer(make_model(ds, codes), ds, cfg, out_dir=tmp_path, show_progress=False,
                    eval_fn=_scripted_eval([1.0]))
    again.resume(tmp_path / "checkpoint.pt")
    assert again.selection["best_step"] == 4 and again.train() == [] and again.step == 8


def test_resume_drops_metric_rows_after_the_checkpoint(world, tmp_path):
    _, codes, ds, _ = world
    cfg = TrainConfig(steps=8, batch_size=4, warmup_steps=1, log_every=2, ckpt_every=4)
    first = Trainer(make_model(ds, codes), ds, cfg, out_dir=tmp_path, show_progress=False)
    log = first._log

    def killed_after_step_6(row):  # the process dies after logging step 6, before its next checkpoint
        log(row)
        if row["step"] == 6:
            raise KeyboardInterrupt

    first._log = killed_after_step_6
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["schedule"]["step"] == 4
    resumed = Trainer(make_model(ds, codes), ds, cfg, out_dir=tmp_path, show_progress=False)
    resumed.resume(tmp_path / "checkpoint.pt")
    resumed.train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    csv_steps = [int(float(line.split(",")[0])) for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == csv_steps == [2, 4, 6, 8]


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(world, tmp_path):
    _, codes, ds, _ = world
    model = make_model(ds, codes)
    forward = model.forward
    calls = {"n": 0}

    def poisoned(batch):  # the 6th step's loss is NaN
        calls["n"] += 1
        loss = forward(batch)
        return loss * float("nan") if calls["n"] == 6 else loss

    model.forward = poisoned
    cfg = TrainConfig(steps=20, batch_size=4, warmup_steps=1, log_every=3, ckpt_every=2)
    trainer = Trainer(model, ds, cfg, out_dir=tmp_path, show_progress=False)
    with pytest.raises(NonFiniteTrainingError, match="at step 6"):
        trainer.train()
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["schedule"]["step"] == 4  # the save at step 6 was refused
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    with pytest.raises(NonFiniteTrainingError):
        trainer.save()
    # a diverged checkpoint is refused by evaluate/generate
    bad = dict(ck, model={k: v.clone() for k, v in ck["model"].items()})
    next(v for v in bad["model"].values() if v.is_floating_point()).fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        model_from_checkpoint(bad)


def test_sasrec_early_stops_on_validation_and_is_cached(world, monkeypatch, capsys):
    log = world[0]
    model = train_sasrec(log, SASRecConfig(epochs=30, patience=2, d_model=16, max_len=10), show_progress=False)
    sel = model.selection
    assert 1 <= sel["epoch"] <= 30 and 0 <= sel["ndcg@10"] <= sel["recall@10"] <= 1
    cfg = SASRecConfig(epochs=2, d_model=16, max_len=10)
    first = evaluate_mod.sasrec_metrics(log, cfg, show_progress=False)
    assert "training on the same split" in capsys.readouterr().out

    def no_training(*args, **kwargs):
        raise AssertionError("the cached result should have been used")

    monkeypatch.setattr("onerec_fast.train.baselines.train_sasrec", no_training)
    assert evaluate_mod.sasrec_metrics(log, cfg, show_progress=False) == first
    assert "cached result" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="cached"):  # another split or config is another entry
        evaluate_mod.sasrec_metrics(log, cfg, split="valid", show_progress=False)


def test_recipes():
    assert choose_recipe("auto", 296_337).name == "small"  # Amazon Sports
    assert choose_recipe("auto", 3_700_000).name == "small"  # Steam as SASRec preprocesses it
    assert choose_recipe("auto", SMALL_MAX_INTERACTIONS + 1).name == "tr"
    with pytest.raises(ValueError, match="recipe"):
        choose_recipe("huge", 10)
    assert steps_for_epochs(2, 1000, 256) == 8 and steps_for_epochs(0.001, 10, 256) == 1


def test_collision_codes_follow_popularity():
    codes = torch.tensor([[0, 1], [0, 1], [2, 2], [0, 1], [2, 2]])
    assert disambiguate(codes)[:, 2].tolist() == [0, 1, 0, 2, 1]  # item order
    popularity = torch.tensor([5, 1, 3, 9, 4])
    assert disambiguate(codes, -popularity)[:, 2].tolist() == [1, 2, 1, 0, 0]  # most popular first
    with pytest.raises(ValueError, match="rank"):
        disambiguate(codes, popularity[:3])


def test_trie_loss_masks_each_level_to_the_prefix_children(world):
    log, _, _, _ = world
    i = torch.arange(log.num_items)
    codes = torch.stack([i // 16, i // 2 % 8, i % 2 * 3], 1)  # unique; each level-2 prefix has 2 of 4 codes
    ds = UserSequenceDataset(log, codes, "train", config=BatchConfig(short_len=5, positive_len=8, lifelong_len=64))
    model = make_model(ds, codes, trie_loss=True).eval()
    target = codes[[0, 5, 17, 40]]
    masks = model.prefix_masks(target)
    for lvl, m in enumerate(masks):
        for r in range(target.shape[0]):
            same = (codes[:, :lvl] == target[r, :lvl]).all(1)
            assert set(torch.nonzero(m[r]).flatten().tolist()) == set(codes[same, lvl].tolist())
    batch = ds.batch(np.arange(8))
    full = make_model(ds, codes, trie_loss=False).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert model(batch) < full(batch)  # the same logits, renormalized over fewer codes that hold the target
        out = model.generate(batch, beam_size=8, num_return=4)
        valid = full.generate(batch, beam_size=8, num_return=4, normalize="valid")
    assert torch.equal(out.item_ids, valid.item_ids)  # generation follows the training normalization


@pytest.mark.parametrize("fmt", ["txt", "csv"])
def test_cli_trains_and_evaluates_sources_without_engagement(tmp_path, fmt, capsys):
    """The Sports file's format (``user item item ...``) and a CSV without a rating column, through the CLI:
    train with validation (best.pt), then evaluate the run folder."""
    from onerec_fast.cli import main

    seq = _sequence_file(tmp_path, users=30, items=25)
    data = seq
    if fmt == "csv":
        rows = [(int(u), int(i), t) for u, *items in (ln.split() for ln in seq.read_text().splitlines())
                for t, i in enumerate(items)]
        data = tmp_path / "interactions.csv"
        data.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    out = tmp_path / f"run-{fmt}"
    assert main(["train", "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "8",
                 "--eval-every", "2", "--eval-users", "10", "--warmup", "1", "--ckpt-every", "0"]) == 0
    printed = capsys.readouterr().out
    assert "recipe small" in printed and "best:" in printed and (out / "best.pt").exists()
    assert main(["evaluate", "--checkpoint", str(out), "--no-baselines", "--beam", "16",
                 "--out", str(out / "eval.json")]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["checkpoint"].endswith("best.pt") and res["results"]["OneRec"]["legality"] == 1.0


def test_default_codebook_size():
    from onerec_fast.train.pipeline import default_codebook_size

    # several levels: ~2 * N^(1/levels) rounded up to a power of two; one level: the power of two nearest sqrt(N)
    assert [default_codebook_size(n, 3) for n in (1682, 18357)] == [32, 64]
    assert [default_codebook_size(n, 1) for n in (10, 1682, 18357, 10**6, 10**9)] == [4, 32, 128, 1024, 8192]


def test_cli_code_levels(tmp_path, capsys):
    """``--code-levels`` sets the tokenizer's levels: one semantic level plus the collision level."""
    from onerec_fast.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(_sequence_file(tmp_path, users=30, items=25)), "--out", str(out),
                 "--steps", "2", "--batch-size", "8", "--eval-every", "0", "--warmup", "1", "--ckpt-every", "0",
                 "--code-levels", "1"]) == 0
    assert "1 levels x 4 codes" in capsys.readouterr().out
    model = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    assert model.item_codes.shape == (25, 2) and len(torch.unique(model.item_codes, dim=0)) == 25


def test_cli_neighbour_mean(tmp_path, capsys):
    """``train`` tokenizes the items' own fused vectors by default and their neighbour means with
    ``--neighbour-mean``; the codes are those of ``prepare`` with the same choice."""
    from onerec_fast.cli import main
    from onerec_fast.train.pipeline import prepare

    data = _sequence_file(tmp_path, users=30, items=25)
    codes = {}
    for flag, on in (([], False), (["--neighbour-mean"], True)):
        out = tmp_path / f"run{on}"
        assert main(["train", "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "8",
                     "--eval-every", "0", "--warmup", "1", "--ckpt-every", "0", *flag]) == 0
        assert ("co-occurring items" in capsys.readouterr().out) == on
        codes[on] = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt")).item_codes
        want = prepare(str(data), neighbour_mean=on, short_len=20, positive_len=50, lifelong_len=1000,
                       splits=(), verbose=False).item_codes
        assert torch.equal(codes[on], want)
    assert not torch.equal(codes[True], codes[False])


def test_prepare_tokenizes_given_item_vectors(tmp_path):
    """``prepare(item_vectors=...)`` quantizes the caller's vectors (two far-apart groups get different first
    codes) instead of the fused embeddings, and a wrong row count names the argument."""
    from onerec_fast.train.pipeline import prepare

    log = load_sequences(_sequence_file(tmp_path, users=60, items=40, seed=3))
    n = log.num_items
    vec = torch.randn(n, 16) * 0.01
    vec[: n // 2, 0] += 10.0
    vec[n // 2:, 0] -= 10.0
    prep = prepare("unused", loaded=(log, None), item_vectors=vec, codebook_size=2, splits=("train",), verbose=False,
                   lifelong_len=10_000)
    first = prep.item_codes[:, 0]
    assert (first[: n // 2] == first[0]).all() and (first[n // 2:] != first[0]).all()
    with pytest.raises(ValueError, match="item_vectors must be"):
        prepare("unused", loaded=(log, None), item_vectors=vec[:-1], verbose=False)


def test_recall_by_target_popularity_buckets():
    """benchmarks/diagnostics/by_target_popularity.py: hits land in the bucket of the target's training count."""
    mod = load_script("benchmarks/diagnostics/by_target_popularity.py")
    counts = np.array([1, 7, 15, 30, 100])  # one item per bucket
    target = torch.tensor([0, 1, 2, 3, 4, 4])
    top = torch.tensor([[0, 9], [9, 9], [2, 9], [9, 9], [4, 9], [9, 9]])
    out = mod.recall_by_count(counts, top, target)
    assert out == {"<=5": [1.0, 1], "<=10": [0.0, 1], "<=20": [1.0, 1], "<=50": [0.0, 1], ">50": [0.5, 2],
                   "all": 0.5}


def test_level_ranks_match_the_training_loss(world):
    """by_target_popularity.level_ranks: the per-level log-probabilities average to minus the trie-normalized
    training loss of the same users, and ranks lie among each prefix's children."""
    mod = load_script("benchmarks/diagnostics/by_target_popularity.py")
    log, _, _, _ = world
    i = torch.arange(log.num_items)
    codes = torch.stack([i // 16, i // 2 % 8, i % 2 * 3], 1)
    ds = UserSequenceDataset(log, codes, "test", config=BatchConfig(short_len=5, positive_len=8, lifelong_len=64))
    model = make_model(ds, codes, trie_loss=True).eval()
    counts = np.arange(log.num_items) % 60  # every bucket holds some targets
    out = mod.level_ranks(model, ds, counts, "cpu", batch_size=7)
    assert sum(v[2] for k, v in out.items() if k != "all") == out["all"][2] == len(ds)
    with torch.no_grad():
        loss = model(ds.batch(np.arange(len(ds)))).item()
    assert -np.mean(out["all"][0]) == pytest.approx(loss, abs=0.01)
    assert all(0 <= r < 16 for v in out.values() for r in v[1])


def test_prefix_eta2():
    """benchmarks/diagnostics/code_predictability.py: eta^2 is 1 when the prefix fixes y, 0 when it says nothing."""
    mod = load_script("benchmarks/diagnostics/code_predictability.py")
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    assert mod.prefix_eta2(codes, np.array([1.0, 1.0, 3.0, 3.0]), 1) == pytest.approx(1.0)
    assert mod.prefix_eta2(codes, np.array([1.0, 3.0, 1.0, 3.0]), 1) == pytest.approx(0.0)
    assert mod.prefix_eta2(codes, np.array([1.0, 3.0, 1.0, 3.0]), 2) == pytest.approx(1.0)
    assert mod.prefix_eta2(codes, np.array([0.0, 2.0, 4.0, 4.0]), 1) == pytest.approx(1 - 2 / 11)


def test_bigram_cross_entropy():
    """code_predictability.py: -log p(group of dst | group of src) from smoothed training pair counts."""
    mod = load_script("benchmarks/diagnostics/code_predictability.py")
    group = np.array([0, 0, 1])  # items 0 and 1 share a prefix, item 2 has its own
    ce = mod.bigram_cross_entropy(group, np.array([0, 1, 2]), np.array([2, 2, 0]), np.array([1, 2]),
                                  np.array([2, 2]), smoothing=0.5)
    # row 0: 0.5 + 0 to group 0, 0.5 + 2 to group 1; row 1: 0.5 + 1 to group 0, 0.5 to group 1
    np.testing.assert_allclose(ce, [-np.log(2.5 / 3), -np.log(0.5 / 2)])
