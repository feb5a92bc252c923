"""Which backward op breaks the capture of the tiny MoE model's step (anomaly mode names the forward)."""
import sys, traceback, torch
sys.path.insert(0, ".")
from tests.model_world import make_log, make_codes, make_dataset, make_model
import onerec_fast.train.pretrain as pt
from onerec_fast.train.pretrain import TrainConfig, Trainer
pt.moe_layers = lambda m: []  # force graphs on the MoE model
log = make_log(); codes = make_codes(log.num_items); ds = make_dataset(log, codes)
for name, over in (("dense", dict(dec_moe_experts=0)), ("moe", {})):
    model = make_model(ds, codes, backend="auto", dropout=0.0, **over)
    t = Trainer(model, ds, TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=2, log_every=4), device="cuda",
                show_progress=False)
    try:
        with torch.autograd.set_detect_anomaly(True, check_nan=False):
            t.train(steps=40)
        print(name, "ok: graphs", len(t._graphs.graphs), "replays", t._graphs.replays, flush=True)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:300], flush=True)
        traceback.print_exc()
        break
