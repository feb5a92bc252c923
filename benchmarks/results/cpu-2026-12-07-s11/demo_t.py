import sys
import onerec_fast.train.cli_train as ct
orig = ct.build_trainer
def patched(targs, *a, **k):
    targs.transition_window = WINDOW
    return orig(targs, *a, **k)
WINDOW = int(sys.argv[1]); del sys.argv[1]
ct.build_trainer = patched
from onerec_fast.cli import main
sys.exit(main(["demo", *sys.argv[1:]]))
