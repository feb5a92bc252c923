"""CPU training step of the small preset on ML-100K, window 3 with and without the count prior (1 thread)."""
import time, numpy as np, torch
from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.onerec import OneRec, features_from_dataset, with_transitions
from onerec_fast.train.pipeline import prepare
torch.set_num_threads(1)
prep = prepare("scratch/data/ml-100k", short_len=20, positive_len=50, lifelong_len=1000, splits=("train",), verbose=False)
ds = prep.datasets["train"]
for prior in (False, True, False, True):
    cfg = OneRecConfig.preset("small", short_len=20, pos_len=50, lifelong_len=1000, transition_window=3, transition_prior=prior,
                              **features_from_dataset(ds, prep.item_codes, use_user_id=False))
    cfg, table = with_transitions(cfg, ds, prep.item_codes)
    torch.manual_seed(0)
    model = OneRec(cfg, prep.item_codes, transitions=table).train()
    opt = torch.optim.AdamW(model.parameters())
    rng = np.random.default_rng(0)
    times = []
    for _ in range(6):
        b = ds.batch(np.sort(rng.permutation(len(ds))[:256]))
        t = time.perf_counter(); model(b).backward(); opt.step(); opt.zero_grad(); times.append(time.perf_counter() - t)
    print("prior" if prior else "plain", f"{np.median(times[2:]):.3f} s/step", flush=True)
