"""The implemented mixture beam search on a checkpoint trained without it (its prior counts): test subset."""
import numpy as np, torch, sys
from onerec_fast.data import BatchConfig
from onerec_fast.data.sources import load_source
from onerec_fast.train.checkpoint import load_checkpoint
from onerec_fast.train.cli_common import model_from_checkpoint
from onerec_fast.train.pipeline import datasets_for
from onerec_fast.train.evaluate import evaluate_onerec
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
ck = load_checkpoint(sys.argv[1]); ck["model_config"]["transition_mixture"] = True
ck["model"]["decoder.transition_mix"] = torch.tensor(0.5)
model = model_from_checkpoint(ck).eval(); cfg = model.cfg
log, _ = load_source(sys.argv[2])
bc = BatchConfig(short_len=cfg.short_len, positive_len=cfg.pos_len, lifelong_len=cfg.lifelong_len)
dss = datasets_for(log, model.item_codes.cpu(), None, bc, ("valid", "test"))
rng = np.random.default_rng(0)
for split in ("valid", "test"):
    ds = dss[split]; idx = np.sort(rng.choice(len(ds), min(len(ds), int(sys.argv[3])), replace=False))
    for w in map(float, sys.argv[4].split(",")):
        model.set_transition_mixture(w)
        r = evaluate_onerec(model, ds, beam_size=128, batch_size=256, indices=idx, show_progress=False)
        print(split, "w", w, {k: round(v, 4) for k, v in r.items()}, flush=True)
