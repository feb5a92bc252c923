"""No code runs from a checkpoint (issue 17, finding 1): every command that loads one (``evaluate``,
``generate``, ``rl --checkpoint/--pscore/--resume``, ``train --resume``) refuses a planted DCP ``.metadata``, a
planted non-tensor DCP entry, a planted ``trainer.pt`` and a planted ``.pt``. The payload creates a marker file
when unpickled; the tests check the load raises and the marker never appears. Also: clear one-line errors for a
file that is no checkpoint, run folders resolved to the checkpoint inside, and ``train --resume`` never picking
an unreadable newer checkpoint over a good one.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from onerec_fast.train.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from onerec_fast.train.cli_common import load_run, model_from_checkpoint
from onerec_fast.train.dcp_reader import UnsafeCheckpointError, read_metadata
from onerec_fast.train.pretrain import param_groups

_SMALL_WORLD = [x for kv in ("num_users=40", "num_items=64", "median_history=20", "max_history=40",
                             "heavy_user_frac=0") for x in ("--synthetic", kv)]


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the payload ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A folder holding the ``checkpoint.pt`` of a 1-step ``onerec-fast train`` run on a small synthetic world."""
    from onerec_fast.train import cli_train

    out = tmp_path_factory.mktemp("train")
    torch.set_num_threads(1)
    argv = ["--steps", "1", "--batch-size", "8", "--warmup", "1", "--out", str(out), *_SMALL_WORLD]
    assert cli_train.run(_parse(cli_train, argv)) == 0
    return out


@pytest.fixture()
def marker(tmp_path):
    m = tmp_path / "payload-ran"
    yield m
    assert not m.exists(), "a pickled payload ran while loading a checkpoint"


def _write_dcp(pt: Path, folder: Path, lr=None) -> Path:
    """The training checkpoint ``pt`` written again as the DCP folder a torchrun save makes (through one
    process), with the first parameter group's ``lr`` replaced by ``lr`` when given (a planted entry)."""
    ck = load_checkpoint(pt)
    model = model_from_checkpoint(ck)
    opt = torch.optim.AdamW(param_groups(model, 0.0))  # the trainers' groups
    opt.load_state_dict(ck["optimizer"])
    model_sd, optim_sd = get_state_dict(model, opt)
    if lr is not None:
        optim_sd["param_groups"][0]["lr"] = lr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=folder)
    save_checkpoint(folder / "trainer.pt", {**{k: v for k, v in ck.items() if k not in ("model", "optimizer")},
                                            "optimizer_initialized": True})
    return folder


def _plant_metadata(folder: Path, marker: Path) -> Path:
    """``folder``'s real ``.metadata`` with the payload hidden in one field."""
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    metadata.storage_meta.modules = [_Payload(marker)]
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    return folder


def _plant_file(path: Path, marker: Path) -> Path:
    torch.save({"step": 1, "meta": _Payload(marker)}, path)
    return path


@pytest.fixture()
def planted(train_run, tmp_path, marker):
    """name -> a checkpoint of ``train_run``'s model with a payload planted in it."""
    pt = train_run / "checkpoint.pt"
    return {
        "metadata": _plant_metadata(_write_dcp(pt, tmp_path / "metadata.dcp"), marker),
        "entry": _write_dcp(pt, tmp_path / "entry.dcp", lr=_Payload(marker)),
        "trainer.pt": _plant_file(_write_dcp(pt, tmp_path / "trainer.dcp") / "trainer.pt", marker).parent,
        "pt": _plant_file(tmp_path / "planted.pt", marker),
    }


# --------------------------------------------------------------------------------------------- the readers
def test_a_clean_dcp_folder_loads_whole(train_run, tmp_path):
    ck = load_checkpoint(train_run / "checkpoint.pt")
    folder = _write_dcp(train_run / "checkpoint.pt", tmp_path / "clean.dcp")
    back = load_checkpoint(folder)
    assert back["model"].keys() == ck["model"].keys()
    assert all(torch.equal(back["model"][k], v) for k, v in ck["model"].items())


def test_planted_metadata_is_refused_naming_the_file(train_run, tmp_path, marker):
    folder = _plant_metadata(_write_dcp(train_run / "checkpoint.pt", tmp_path / "x.dcp"), marker)
    with pytest.raises(UnsafeCheckpointError, match=r"x\.dcp/\.metadata.*builtins\.open|x\.dcp/\.metadata.*open"):
        read_metadata(folder / ".metadata")
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))  # nothing but the payload
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata"):
        load_checkpoint(folder)


def test_metadata_naming_files_outside_its_folder_is_refused(train_run, tmp_path):
    folder = _write_dcp(train_run / "checkpoint.pt", tmp_path / "y.dcp")
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(UnsafeCheckpointError, match="not a file of its folder"):
        load_checkpoint(folder)


# --------------------------------------------------------------------------------------------- every command
@pytest.mark.parametrize("kind", ["metadata", "trainer.pt", "pt"])
def test_evaluate_and_generate_refuse_planted_checkpoints(planted, kind):
    from onerec_fast.train import cli_evaluate, cli_generate

    with pytest.raises(UnsafeCheckpointError):
        cli_evaluate.run(_parse(cli_evaluate, ["--checkpoint", str(planted[kind])]))
    with pytest.raises(UnsafeCheckpointError):
        cli_generate.run(_parse(cli_generate, ["--checkpoint", str(planted[kind]), "--users", "0"]))


@pytest.mark.parametrize("kind", ["metadata", "trainer.pt", "pt"])
def test_rl_checkpoint_refuses_planted_checkpoints(planted, tmp_path, kind):
    from onerec_fast.rl import cli

    with pytest.raises(UnsafeCheckpointError):
        cli.run(_parse(cli, ["--checkpoint", str(planted[kind]), "--out", str(tmp_path / "rl"), "--device", "cpu"]))


def _rl_argv(train_run, tmp_path, *extra):
    return ["--checkpoint", str(train_run / "checkpoint.pt"), "--out", str(tmp_path / "rl"), "--device", "cpu",
            "--steps", "1", "--users-per-round", "4", "--group-size", "2", "--eval-every", "0", *extra]


@pytest.mark.parametrize("kind", ["metadata", "pt"])
def test_rl_pscore_refuses_planted_checkpoints(planted, train_run, tmp_path, kind):
    from onerec_fast.rl import cli

    with pytest.raises(UnsafeCheckpointError):
        cli.run(_parse(cli, _rl_argv(train_run, tmp_path, "--pscore", str(planted[kind]))))


@pytest.mark.parametrize("kind", ["metadata", "entry", "trainer.pt", "pt"])
def test_rl_resume_refuses_planted_checkpoints(planted, train_run, tmp_path, kind):
    from onerec_fast.rl import cli

    with pytest.raises(UnsafeCheckpointError):
        cli.run(_parse(cli, _rl_argv(train_run, tmp_path, "--reward", "true", "--resume", str(planted[kind]))))


def test_train_resume_refuses_a_planted_entry_in_a_newer_dcp(train_run, tmp_path, marker):
    """A newer ``checkpoint.dcp`` beside a good ``checkpoint.pt``: its payload must not run (the audit's case
    where a planted ``lr`` even let training finish)."""
    from onerec_fast.train import cli_train

    out = tmp_path / "run"
    shutil.copytree(train_run, out)
    _write_dcp(out / "checkpoint.pt", out / "checkpoint.dcp", lr=_Payload(marker))
    os.utime(out / "checkpoint.pt", ns=(1, 1))  # the .dcp is the newest
    argv = ["--steps", "2", "--batch-size", "8", "--warmup", "1", "--out", str(out), "--resume", *_SMALL_WORLD]
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint\.dcp.*'optimizer\.param_groups\.0\.lr'"):
        cli_train.run(_parse(cli_train, argv))


# --------------------------------------------------------------------------------------------- find / resolve
def test_find_checkpoint_never_prefers_an_unreadable_newer_one(train_run, tmp_path, marker):
    out = tmp_path / "run"
    shutil.copytree(train_run, out)
    good = out / "checkpoint.pt"
    os.utime(good, ns=(1, 1))
    for make_bad in (lambda p: _plant_metadata(_write_dcp(good, p), marker),  # planted metadata
                     lambda p: p.mkdir(),  # an unknown folder: no trainer.pt, no .metadata
                     lambda p: p.write_text("not a checkpoint"),
                     lambda p: p.symlink_to("nowhere")):  # a dangling version link
        bad = out / "checkpoint.dcp"
        make_bad(bad)
        with pytest.raises(ValueError, match=r"checkpoint\.dcp cannot be read.*resume from the older .*checkpoint\.pt"):
            find_checkpoint(out, "checkpoint")
        if bad.is_dir() and not bad.is_symlink():
            shutil.rmtree(bad)
        else:
            bad.unlink()
    assert find_checkpoint(out, "checkpoint") == good
    os.utime(good, ns=(2, 2))
    _write_dcp(good, out / "checkpoint.dcp")  # newer and readable: chosen
    assert find_checkpoint(out, "checkpoint") == out / "checkpoint.dcp"


def test_a_file_that_is_no_checkpoint_gives_one_clear_line(tmp_path):
    readme = Path(__file__).resolve().parents[1] / "README.md"
    for path in (readme, tmp_path / "empty.pt"):
        path.touch()
        with pytest.raises(ValueError) as e:
            load_run(str(path))
        message = str(e.value)
        assert "is not a checkpoint" in message and str(path) in message
        assert "\n" not in message and "weights_only" not in message


def test_a_run_folder_resolves_to_its_best_then_its_checkpoint(train_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="best.pt, best.dcp, checkpoint.pt, checkpoint.dcp"):
        resolve_checkpoint(run)
    shutil.copy(train_run / "checkpoint.pt", run / "checkpoint.pt")
    assert resolve_checkpoint(run) == run / "checkpoint.pt"
    model, log, _, ds = load_run(str(run))  # `evaluate --checkpoint runs/x`
    assert model.item_codes.shape[0] == log.num_items and "test" in ds
    shutil.copy(train_run / "checkpoint.pt", run / "best.pt")
    assert resolve_checkpoint(run) == run / "best.pt"
    assert resolve_checkpoint(run, prefer=("checkpoint",)) == run / "checkpoint.pt"
    assert resolve_checkpoint(run / "checkpoint.pt") == run / "checkpoint.pt"
    dcp_folder = _write_dcp(run / "checkpoint.pt", tmp_path / "c.dcp")
    assert resolve_checkpoint(dcp_folder) == dcp_folder  # a DCP folder is a checkpoint, not a run folder
