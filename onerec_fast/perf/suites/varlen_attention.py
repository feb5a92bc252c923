"""Benchmark suite: variable-length cross-attention, the QFormer built on it, and beam-shared decoding.

Attention cases (bf16 on CUDA): B in {256, 1024}, Lq = 128 queries per row, Lk ragged uniform in
[512, 2048], heads 8/8 with head_dim 64 and 128, and GQA 8/2; forward and forward+backward.
Implementations, all on the same inputs:

* ``reference``        -- the plain PyTorch reference backend (pads, matmul-softmax-matmul in fp32);
* ``sdpa_padded_mask`` -- SDPA on keys/values padded to the longest row with a boolean mask (GQA
  heads repeated beforehand so SDPA's masked kernels apply); padding is done outside the timing;
* ``sdpa_dense_full``  -- SDPA on dense keys/values at the full length 2048 (no mask): an upper
  bound that does the padded work at flash-attention speed;
* ``flex_attention``   -- FlexAttention (compiled) on the padded keys with a block mask;
* ``triton``           -- this package's kernel on the jagged keys/values.

FLOPs count real (unpadded) keys only. The encoder's self-attention (the 0.015b model on Amazon Sports: 256
users x 199 slots, 5 heads of 32; each user's real slots one window with padding on both sides, forward and
forward+backward): ``sdpa_mask`` (SDPA with the boolean key mask, the speedup column's base), FlexAttention with
a block mask of the window, the reference backend, and ``triton`` (``padded_cross_attention(key_starts=...)``).
Then the whole QFormer (2 blocks, d=1024, 128 queries)
forward+backward, triton vs reference backend, and the decode case: 64 users x 128 beams over each
user's 405 encoder states (Hq=8, D=128), against SDPA over keys/values replicated per beam.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from onerec_fast.perf.flops import attention_flops, swiglu_flops
from onerec_fast.perf.harness import Case, Unavailable

SUITE = "varlen_attention"
FULL_LENGTH = 2048


def _probe(make):
    """Build an implementation and run it once so that a backend missing here (or a compile
    failure) shows as ``n/a`` instead of failing the run."""

    @functools.wraps(make)
    def wrapped(inputs):
        try:
            fn = make(inputs)
            fn()
        except torch.cuda.OutOfMemoryError:
            raise
        except Unavailable:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure of an optional backend is reported, not fatal
            raise Unavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from e
        return fn

    return wrapped


@functools.cache
def _compiled_flex_attention():
    """One compiled FlexAttention for every case (Dynamo recompiles per shape as needed)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _timed(outputs_of, inputs, backward: bool):
    """Zero-arg fn: the forward, or the forward and the gradients of every input that needs one."""
    leaves = [t for t in inputs["leaves"] if t.requires_grad]

    def fwd():
        return outputs_of()

    def fwd_bwd():
        out = outputs_of()
        return torch.autograd.grad(out, leaves, inputs["dout"])

    return fwd_bwd if backward else fwd


def _pad(x: torch.Tensor, cu: torch.Tensor, lengths: list[int], length: int, heads: int) -> torch.Tensor:
    """Jagged ``[T, Hkv, D]`` -> padded ``[B, heads, length, D]`` (zeros past each row's end; key/value
    heads repeated up to ``heads``)."""
    batch = len(lengths)
    row = torch.repeat_interleave(torch.arange(batch, device=x.device), torch.tensor(lengths, device=x.device))
    pos = torch.arange(x.shape[0], device=x.device) - cu[:-1].long()[row]
    out = x.new_zeros(batch, length, x.shape[1], x.shape[2])
    out[row, pos] = x
    return out.repeat_interleave(heads // x.shape[1], dim=2).transpose(1, 2).contiguous()


def _attention_case(device, dtype, batch, seqlen_q, k_range, heads, kv_heads, head_dim, backward, quick) -> Case:
    from onerec_fast.ops.varlen_attention import varlen_cross_attention

    g = torch.Generator().manual_seed(batch * 7 + head_dim)
    lengths = torch.randint(k_range[0], k_range[1] + 1, (batch,), generator=g).tolist()
    max_len, full_len = max(lengths), (k_range[1] if quick else FULL_LENGTH)
    flops = attention_flops([seqlen_q] * batch, lengths, heads, head_dim, backward=backward)

    def setup():
        gen = torch.Generator().manual_seed(0)
        total = sum(lengths)
        q = torch.randn(batch, heads, seqlen_q, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(total, kv_heads, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(total, kv_heads, head_dim, generator=gen).to(device, dtype)
        cu = torch.zeros(batch + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
        dout = torch.randn(batch, heads, seqlen_q, head_dim, generator=gen).to(device, dtype)
        return {"q": q, "k": k, "v": v, "cu": cu.to(device), "dout": dout, "leaves": [q, k, v]}

    def ours(backend):
        def make(x):
            return _timed(lambda: varlen_cross_attention(x["q"], x["k"], x["v"], x["cu"], backend=backend,
                                                         max_seqlen_k=max_len, validate=False), x, backward)
        return make

    # Padded length rounded up to 64: SDPA's memory-efficient kernel needs an aligned mask (else
    # it falls back to the math path), and 64 keeps FlexAttention's blocks whole.
    pad_len = -(-max_len // 64) * 64

    def padded(x):
        kp = _pad(x["k"].detach(), x["cu"], lengths, pad_len, heads).requires_grad_(backward)
        vp = _pad(x["v"].detach(), x["cu"], lengths, pad_len, heads).requires_grad_(backward)
        mask = torch.arange(pad_len, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        return kp, vp, mask

    def sdpa_padded_mask(x):
        kp, vp, mask = padded(x)
        inputs = dict(x, leaves=[x["q"], kp, vp])
        attn_mask = mask[:, None, None, :]
        return _timed(lambda: F.scaled_dot_product_attention(x["q"], kp, vp, attn_mask=attn_mask), inputs, backward)

    def sdpa_dense_full(x):
        gen = torch.Generator().manual_seed(1)
        kd, vd = (torch.randn(batch, kv_heads, full_len, head_dim, generator=gen).to(device, dtype)
                  .requires_grad_(backward) for _ in range(2))
        inputs = dict(x, leaves=[x["q"], kd, vd])
        gqa = heads != kv_heads
        return _timed(lambda: F.scaled_dot_product_attention(x["q"], kd, vd, enable_gqa=gqa), inputs, backward)

    def flex(x):
        if quick:
            raise Unavailable("not in the quick (CPU) run: compiling FlexAttention takes minutes there")
        from torch.nn.attention.flex_attention import create_block_mask

        kp, vp, _ = padded(x)
        lens = torch.tensor(lengths, device=device)
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lens[b], batch, None, seqlen_q, pad_len,
                                       device=device)
        compiled = _compiled_flex_attention()
        inputs = dict(x, leaves=[x["q"], kp, vp])
        return _timed(lambda: compiled(x["q"], kp, vp, block_mask=block_mask), inputs, backward)

    impls = {
        "reference": _probe(ours("reference")),
        "sdpa_padded_mask": _probe(sdpa_padded_mask),
        "sdpa_dense_full": _probe(sdpa_dense_full),
        "flex_attention": _probe(flex),
        "triton": _probe(ours("triton")),
    }
    name = (f"B{batch} Lq{seqlen_q} Lk{k_range[0]}-{k_range[1]} h{heads}/{kv_heads} d{head_dim} "
            f"{'fwd+bwd' if backward else 'fwd'}")
    return Case(SUITE, name, flops, setup, impls, dtype=dtype,
                params={"B": batch, "Lq": seqlen_q, "Lk": list(k_range), "Hq": heads, "Hkv": kv_heads, "D": head_dim,
                        "backward": backward})


def _window_case(device, dtype, batch, length, heads, head_dim, backward, quick) -> Case:
    """Self-attention of ``[B, S]`` slots where user b's real slots are ``lo[b] <= s < hi[b]`` (the encoder's
    layout: padding before the short-term items and after the positive-feedback ones)."""
    from onerec_fast.ops.varlen_attention import padded_cross_attention

    g = torch.Generator().manual_seed(length)
    lo = torch.randint(0, min(20, length), (batch,), generator=g)
    hi = torch.maximum(lo + 1, torch.randint(max(length - 50, 1), length + 1, (batch,), generator=g))
    flops = attention_flops([length] * batch, (hi - lo).tolist(), heads, head_dim, backward=backward)

    def setup():
        gen = torch.Generator().manual_seed(0)
        qkv = torch.randn(batch, length, 3, heads, head_dim, generator=gen).to(device, dtype).requires_grad_(backward)
        dout = torch.randn(batch, heads, length, head_dim, generator=gen).to(device, dtype)
        slot = torch.arange(length, device=device)
        lo_d, hi_d = lo.to(device), hi.to(device)
        mask = (slot[None] >= lo_d[:, None]) & (slot[None] < hi_d[:, None])
        return {"qkv": qkv, "dout": dout, "leaves": [qkv], "lo": lo_d, "hi": hi_d, "mask": mask,
                "starts": lo_d.int(), "lens": (hi_d - lo_d).int()}  # the model's int32 window

    def heads_first(x):  # q, k, v: [B, H, S, D] views of the projection, as the model's split_heads gives
        return [t.transpose(1, 2) for t in x["qkv"].unbind(2)]

    def ours(backend):
        def make(x):
            def run():
                q, k, v = heads_first(x)
                return padded_cross_attention(q, k.transpose(1, 2), v.transpose(1, 2), x["lens"], backend=backend,
                                              validate=False, key_starts=x["starts"])
            return _timed(run, x, backward)
        return make

    def sdpa_mask(x):
        key_mask = x["mask"][:, None, None, :]
        return _timed(lambda: F.scaled_dot_product_attention(*heads_first(x), attn_mask=key_mask), x, backward)

    def flex(x):
        if quick:
            raise Unavailable("not in the quick (CPU) run: compiling FlexAttention takes minutes there")
        from torch.nn.attention.flex_attention import create_block_mask

        lo_d, hi_d = x["lo"], x["hi"]
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: (kv_idx >= lo_d[b]) & (kv_idx < hi_d[b]), batch,
                                       None, length, length, device=device)
        compiled = _compiled_flex_attention()
        return _timed(lambda: compiled(*heads_first(x), block_mask=block_mask), x, backward)

    impls = {"sdpa_mask": _probe(sdpa_mask), "flex_attention": _probe(flex), "reference": _probe(ours("reference")),
             "triton": _probe(ours("triton"))}
    name = f"window self-attn B{batch} S{length} h{heads} d{head_dim} {'fwd+bwd' if backward else 'fwd'}"
    return Case(SUITE, name, flops, setup, impls, reference="sdpa_mask", dtype=dtype,
                params={"B": batch, "S": length, "H": heads, "D": head_dim, "backward": backward})


def qformer_flops(batch: int, lengths: list[int], d_model: int, d_kv: int, num_queries: int, num_blocks: int,
                  num_heads: int, d_ff: int, backward: bool) -> float:
    """Useful FLOPs of :class:`onerec_fast.QFormer`: projections, cross-attention over real keys,
    self-attention, SwiGLU FFN (norms and residuals omitted). Block 1's query projection runs once
    for the shared queries."""
    rows, total = batch * num_queries, sum(lengths)
    head_dim = d_model // num_heads
    mult = 3.0 if backward else 1.0
    per_block = 0.0
    for block in range(num_blocks):
        q_rows = num_queries if block == 0 else rows
        per_block += mult * 2.0 * (q_rows * d_model * d_model + 2 * total * d_kv * d_model + rows * d_model * d_model)
        per_block += attention_flops([num_queries] * batch, lengths, num_heads, head_dim, backward=backward)
        per_block += mult * 2.0 * rows * d_model * 4 * d_model  # self-attention qkv + o projections
        per_block += attention_flops([num_queries] * batch, [num_queries] * batch, num_heads, head_dim,
                                     backward=backward)
        per_block += swiglu_flops(rows, d_model, d_ff, backward=backward)
    return per_block


def _qformer_case(device, dtype, batch, k_range, d_model, num_queries, num_blocks, num_heads, quick) -> Case:
    from onerec_fast.modules.qformer import QFormer

    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(k_range[0], k_range[1] + 1, (batch,), generator=g).tolist()
    d_ff = 4 * d_model
    flops = qformer_flops(batch, lengths, d_model, d_model, num_queries, num_blocks, num_heads, d_ff, True)

    def setup():
        torch.manual_seed(0)
        models = {b: QFormer(d_model, num_queries, num_blocks, num_heads, backend=b).to(device, dtype)
                  for b in ("reference", "triton")}
        models["triton"].load_state_dict(models["reference"].state_dict())
        gen = torch.Generator().manual_seed(0)
        values = torch.randn(sum(lengths), d_model, generator=gen).to(device, dtype).requires_grad_()
        cu = torch.zeros(batch + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        dout = torch.randn(batch, num_queries, d_model, generator=gen).to(device, dtype)
        return {"models": models, "values": values, "cu": cu.to(device), "dout": dout}

    def module(backend):
        def make(x):
            model = x["models"][backend]
            inputs = {"leaves": [*model.parameters(), x["values"]], "dout": x["dout"]}
            return _timed(lambda: model(x["values"], offsets=x["cu"], max_len=max(lengths), validate=False),
                          inputs, True)
        return make

    name = f"QFormer B{batch} d{d_model} q{num_queries} blocks{num_blocks} Lk{k_range[0]}-{k_range[1]} fwd+bwd"
    impls = {"reference": _probe(module("reference")), "triton": _probe(module("triton"))}
    return Case(SUITE, name, flops, setup, impls, dtype=dtype,
                params={"B": batch, "d": d_model, "queries": num_queries, "blocks": num_blocks, "Lk": list(k_range)})


def _beam_case(device, dtype, users, beams, length, heads, head_dim) -> Case:
    from onerec_fast.ops.varlen_attention import beam_shared_cross_attention

    flops = attention_flops([beams] * users, [length] * users, heads, head_dim)

    def setup():
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(users, beams, heads, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(users, length, heads, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(users, length, heads, head_dim, generator=gen).to(device, dtype)
        return {"q": q, "k": k, "v": v}

    def ours(backend):
        def make(x):
            return lambda: beam_shared_cross_attention(x["q"], x["k"], x["v"], backend=backend, validate=False)
        return make

    def sdpa_replicated(x):
        # Every beam its own row holding its own copy of the user's states (copies made untimed).
        q = x["q"].reshape(users * beams, heads, 1, head_dim)
        k, v = (t.transpose(1, 2).repeat_interleave(beams, dim=0) for t in (x["k"], x["v"]))  # [U*beams, H, L, D]
        return lambda: F.scaled_dot_product_attention(q, k, v)

    name = f"beam decode {users}x{beams} beams Lk{length} h{heads} d{head_dim} fwd"
    impls = {"sdpa_replicated": _probe(sdpa_replicated), "reference": _probe(ours("reference")),
             "triton": _probe(ours("triton"))}
    return Case(SUITE, name, flops, setup, impls, reference="sdpa_replicated", dtype=dtype,
                params={"users": users, "beams": beams, "Lk": length, "Hq": heads, "D": head_dim})


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:  # CPU: tiny shapes, fp32 (the interpreter cannot run bf16), seconds in all
        dt = torch.float32
        return [
            _attention_case(device, dt, 3, 8, (5, 40), 2, 1, 32, False, True),
            _attention_case(device, dt, 3, 8, (5, 40), 2, 1, 32, True, True),
            _window_case(device, dt, 3, 29, 2, 32, True, True),
            _qformer_case(device, dt, 2, (5, 40), 64, 8, 1, 2, True),
            _beam_case(device, dt, 2, 4, 21, 2, 32),
        ]
    dt = torch.bfloat16
    out = []
    for heads, kv_heads, head_dim in ((8, 8, 64), (8, 8, 128), (8, 2, 64)):
        for batch in (256, 1024):
            for backward in (False, True):
                out.append(_attention_case(device, dt, batch, 128, (512, 2048), heads, kv_heads, head_dim, backward,
                                           False))
    for backward in (False, True):
        out.append(_window_case(device, dt, 256, 199, 5, 32, backward, False))
    out.append(_qformer_case(device, dt, 256, (512, 2048), 1024, 128, 2, 8, False))
    out.append(_beam_case(device, dt, 64, 128, 405, 8, 128))
    return out
