"""The training step replayed from CUDA graphs: fixed-shape batches (same loss and gradients as jagged ones, on
the CPU), and on a GPU the graphed Trainer against the eager one, its non-finite guard, and recapture when
what a graph reads moves."""

import math

import pytest
import torch

from onerec_fast.model.encoder import PaddedItems
from onerec_fast.train.graph_step import MIN_LIFELONG_SLOTS, fixed_shape_batch, lifelong_slots
from onerec_fast.train.pretrain import NonFiniteTrainingError, TrainConfig, Trainer
from tests.model_world import POS, SHORT, batch_of, make_model, one_thread, world  # noqa: F401 (fixtures)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_lifelong_slots_are_powers_of_two():
    assert [lifelong_slots(n) for n in (0, 1, 8, 9, 16, 17, 1000)] == [MIN_LIFELONG_SLOTS, 8, 8, 16, 16, 32, 1024]


def test_padded_items_from_jagged(world):
    _, _, ds, _ = world
    seq = batch_of(ds, [0, 1, 40, 200]).short
    lens = seq.lengths()
    p = PaddedItems.from_jagged(seq, SHORT + 2)
    assert p.codes.shape == (4, SHORT + 2, 3) and torch.equal(p.lengths, lens)
    for b in range(4):
        lo, hi, n = int(seq.offsets[b]), int(seq.offsets[b + 1]), int(lens[b])
        assert torch.equal(p.codes[b, :n], seq.codes[lo:hi]) and torch.equal(p.item[b, :n], seq.item[lo:hi])
        for k in seq.dense:
            assert torch.equal(p.dense[k][b, :n], seq.dense[k][lo:hi]) and not p.dense[k][b, n:].any()
        assert not p.codes[b, n:].any() and not p.item[b, n:].any()  # zeros: valid indices
    empty = batch_of(ds, [0]).short
    empty = type(empty)(offsets=torch.zeros(3, dtype=torch.int32), item=empty.item[:0], codes=empty.codes[:0],
                        sparse={k: v[:0] for k, v in empty.sparse.items()},
                        dense={k: v[:0] for k, v in empty.dense.items()})
    q = PaddedItems.from_jagged(empty, 4)
    assert q.codes.shape == (2, 4, 3) and not q.lengths.any()
    with pytest.raises(ValueError, match="more than the 2 padded slots"):
        PaddedItems.from_jagged(seq, 2)


def test_fixed_shape_batch_gives_the_same_loss_and_gradients(world):
    """Padding is masked out of every attention and never reaches a gradient: the padded batch's loss and every
    parameter's gradient equal the jagged batch's (eval mode: no dropout)."""
    _, codes, ds, _ = world
    model = make_model(ds, codes).eval()
    b = batch_of(ds, [0, 1, 40, 41, 200, 5, 7])
    fixed = fixed_shape_batch(b, SHORT, POS)
    assert fixed.short.codes.shape[1] == SHORT and fixed.positive.codes.shape[1] == POS
    assert fixed.lifelong.codes.shape[1] == lifelong_slots(int(b.lifelong.lengths().max()))
    grads = []
    for batch in (b, fixed):
        model.zero_grad(set_to_none=True)
        loss = model(batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_no_graphs_on_the_cpu(world):
    _, codes, ds, _ = world
    t = Trainer(make_model(ds, codes, dec_moe_experts=0), ds, TrainConfig(steps=2, batch_size=4, cuda_graph=True),
                show_progress=False)
    assert t._graphs is None
    t.train()
    assert t.step == 2


def test_graphs_are_the_default_where_they_apply():
    """None (the default) means on where graphs apply; the CLI's --cuda-graph / --no-cuda-graph set True / False."""
    import argparse

    from onerec_fast.train import cli_train

    assert TrainConfig().cuda_graph is None
    p = argparse.ArgumentParser()
    cli_train.add_arguments(p)
    assert [p.parse_args(a).cuda_graph for a in ([], ["--cuda-graph"], ["--no-cuda-graph"])] == [None, True, False]


def test_resume_takes_this_runs_capturable_setting(world, tmp_path):
    """A checkpoint written by a graphed run (AdamW groups with capturable=True) resumes in an eager CPU run, whose
    AdamW would refuse capturable=True on CPU parameters; and vice versa a capture needs capturable=True."""
    _, codes, ds, _ = world
    cfg = TrainConfig(steps=4, batch_size=4, log_every=2)
    first = Trainer(make_model(ds, codes), ds, cfg, out_dir=tmp_path, show_progress=False)
    first.train(steps=2)
    for g in first.opt.param_groups:
        g["capturable"] = True  # as a graphed GPU run saves them
    first.save()
    resumed = Trainer(make_model(ds, codes), ds, cfg, show_progress=False)
    resumed.resume(tmp_path / "checkpoint.pt")
    assert not any(g["capturable"] for g in resumed.opt.param_groups)
    resumed.train()
    assert resumed.step == 4


def _gpu_trainer(ds, codes, cuda_graph: bool, moe: bool = False, **cfg) -> Trainer:
    # no dropout: the two runs draw no random numbers
    model = make_model(ds, codes, backend="auto", dropout=0.0, **({} if moe else {"dec_moe_experts": 0}))
    return Trainer(model, ds, TrainConfig(batch_size=8, lr=3e-3, warmup_steps=2, log_every=4, cuda_graph=cuda_graph,
                                          **cfg), device="cuda", show_progress=False)


@cuda
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_graphed_steps_match_the_eager_ones(world, moe):
    """The same run with and without graphs (bf16 autocast, the Triton kernels; dense FFNs, and MoE layers with
    their loss-free bias update): the same losses within bf16 rounding, and the graphs were replayed (a shape's
    first step runs eagerly, its second is captured)."""
    _, codes, ds, _ = world
    eager = _gpu_trainer(ds, codes, cuda_graph=False, moe=moe, steps=24)
    graphed = _gpu_trainer(ds, codes, cuda_graph=True, moe=moe, steps=24)
    a, b = eager.train(), graphed.train()
    assert eager._graphs is None and graphed._graphs.graphs and graphed._graphs.replays >= 10
    assert [s for s, _ in a] == [s for s, _ in b]
    for (s, x), (_, y) in zip(a, b):
        assert math.isfinite(y) and abs(x - y) <= 2e-2 * abs(x) + 1e-3, (s, x, y)
    # The weights agree as a whole. Not element by element: AdamW turns a gradient at rounding level (bf16, the
    # padded against the jagged attention) into a step of size lr, so a few near-zero-gradient entries differ by
    # up to lr per step in any two runs that round differently.
    diff = sum(float((q.float() - p.float()).square().sum()) for p, q in zip(eager.model.parameters(),
                                                                             graphed.model.parameters()))
    norm = sum(float(p.float().square().sum()) for p in eager.model.parameters())
    assert math.sqrt(diff / norm) < 2e-2, math.sqrt(diff / norm)


@cuda
def test_graphed_step_keeps_the_non_finite_guard(world, tmp_path):
    """A weight turned NaN in place (the graphs keep reading it) is caught at the step it happens, the error names
    that step, and the checkpoint written before it survives with finite weights."""
    _, codes, ds, _ = world
    t = _gpu_trainer(ds, codes, cuda_graph=True, steps=40)
    t.out_dir = tmp_path
    t.train(steps=12)
    assert t._graphs.replays > 0
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    with torch.no_grad():
        t.model.encoder.norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteTrainingError, match="step 13"):
        t.train(steps=24)
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(kept[k], good[k]) for k in good)
    assert all(torch.isfinite(v).all() for v in kept.values() if v.is_floating_point())


@cuda
def test_graphs_are_captured_again_when_a_parameter_moves(world):
    _, codes, ds, _ = world
    t = _gpu_trainer(ds, codes, cuda_graph=True, steps=40)
    t.train(steps=12)
    assert t._graphs.graphs
    p = next(t.model.parameters())
    with torch.no_grad():
        p.data = p.data.clone()  # the graphs read the old address
    replays = t._graphs.replays
    t.train(steps=13)
    assert not t._graphs.graphs and t._graphs.replays == replays  # dropped; this step ran eagerly
    t.train(steps=24)
    assert t._graphs.graphs and t._graphs.replays > replays
