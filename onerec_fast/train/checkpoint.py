"""Atomic checkpoints of a training run: one weights-only file in one process, a torch.distributed.checkpoint
(DCP) folder in a process group; both trainers (pretraining, ECPO) save and resume through here.

Single process (``<stem>.pt``): one file holding nested dicts/lists of tensors and plain numbers/strings: the
model and optimizer state dicts, the trainer's own entries (schedule step, data position, configs, meta) and
every RNG state (Python, NumPy, torch CPU and CUDA) converted to tensors, so ``torch.load(weights_only=True)``
reads it and no pickled objects are ever executed on load. It is written to ``<path>.tmp``, flushed to disk,
then moved over ``<path>`` with ``os.replace``, so a crash mid-write leaves the previous checkpoint intact.

Process group (``<stem>.dcp``): the model and optimizer through
``torch.distributed.checkpoint.state_dict.get_state_dict`` and ``dcp.save`` (each rank writes its shards:
DTensor shards under FSDP2, one copy of the replicated tensors under DDP) plus ``trainer.pt`` (the trainer's
entries and rank 0's RNG states, weights-only) into a temporary folder; after a barrier rank 0 renames it to
``<stem>.dcp.version-<id>`` and atomically repoints the symlink ``<stem>.dcp`` at it (``os.replace`` of a
link), then deletes the previous version. ``dcp.load`` reshards on load, so a run saved on N ranks resumes on M
(one process included), DDP or FSDP2 alike; a single-process ``.pt`` also resumes under DDP/FSDP2.
:func:`load_checkpoint` reads either kind whole on CPU (what ``evaluate``/``generate``/``rl`` need);
:func:`resolve_checkpoint` turns a run folder into the checkpoint inside it.

Nothing here unpickles arbitrary objects: files load with ``weights_only=True``, and a DCP folder through
:mod:`onerec_fast.train.dcp_reader` (``.metadata`` by an allow-list of the classes torch writes there, non-tensor
entries with ``weights_only=True``); anything else raises
:class:`~onerec_fast.train.dcp_reader.UnsafeCheckpointError` naming the file before it can run.

Expert parallelism (:func:`~onerec_fast.train.parallel.expert_shards`): each rank holds other rows of the experts
``w1, w3, w2`` and of their AdamW moments, so around ``dcp.save`` / ``dcp.load`` these become DTensors sharded
along dim 0 over the layer's group: the checkpoint holds the whole ``[E, ...]`` tensors, exactly as a run without
expert parallelism writes them, and loads into either kind of run at any world size (a ``.pt`` checkpoint is cut
to the rank's rows on load).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import uuid
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from onerec_fast.train.parallel import all_reduce_sum, broadcast_object, dist_info, expert_shards, is_distributed

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "save_training_state",
    "load_training_state",
    "checkpoint_path",
    "find_checkpoint",
    "resolve_checkpoint",
]

_TRAINER_FILE = "trainer.pt"  # inside a DCP folder: everything but the model and optimizer tensors
_METADATA_FILE = ".metadata"  # inside a DCP folder: what dcp.save wrote about the tensors (pickled by torch)


def rng_state() -> dict:
    """Every RNG state as tensors/ints: Python ``random``, NumPy's global generator, torch CPU and CUDA."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": -1.0 if gauss is None else float(gauss), "has_gauss": gauss is not None},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states for as many devices as this process sees)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"] if py["has_gauss"] else None))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (nested dicts/lists of tensors, numbers, strings) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint whole: a file written by :func:`save_checkpoint` (``weights_only=True``: no code runs
    on load), or a DCP folder of :func:`save_training_state` (its entries plus ``"model"``, the whole model
    state dict on CPU; the optimizer stays on disk: resume with :func:`load_training_state`)."""
    path = Path(path)
    if path.is_dir():
        return {**_read_trainer_file(path), "model": _read_dcp_model(path)}
    return _load_file(path, map_location)


def _load_file(path: Path, map_location="cpu"):
    """``torch.load(path, weights_only=True)``, with one-line errors naming ``path``: FileNotFoundError, a
    ValueError for a file that is no checkpoint (not torch.save's zip format: a README, a text file), and
    :class:`UnsafeCheckpointError` for one that holds other objects than tensors, numbers and strings."""
    from onerec_fast.train.dcp_reader import UnsafeCheckpointError, weights_only_reason

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a checkpoint (not a file written by torch.save)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path}: holds more than tensors, numbers and strings; refusing to load it "
                                    f"({weights_only_reason(e)})") from None


def checkpoint_path(directory: str | os.PathLike | None, stem: str) -> Path:
    """Where a run in this process saves: ``<directory>/<stem>.dcp`` in a process group, else ``<stem>.pt``.
    ``directory`` None (a trainer without ``out_dir``) raises ValueError: such a save needs an explicit path."""
    if directory is None:
        raise ValueError("save() needs a path when the trainer has no out_dir")
    return Path(directory) / f"{stem}{'.dcp' if is_distributed() else '.pt'}"


def find_checkpoint(directory: str | os.PathLike, stem: str) -> Path:
    """The newest of ``<stem>.pt`` and ``<stem>.dcp`` in ``directory`` (a run may switch between one process
    and torchrun); FileNotFoundError when neither exists. The newest must look readable (a torch.save file; a
    DCP folder with ``trainer.pt`` and a ``.metadata`` of allowed classes only): otherwise ValueError naming it
    (and the other one), never a silent fall back to the older one or a load of the unreadable one."""
    candidates = (Path(directory) / f"{stem}.pt", Path(directory) / f"{stem}.dcp")
    found = [p for p in candidates if p.exists() or p.is_symlink()]  # a dangling .dcp link counts: not ours
    if not found:
        raise FileNotFoundError(f"no checkpoint {stem}.pt or {stem}.dcp in {directory}")
    found.sort(key=lambda p: os.lstat(p).st_mtime_ns, reverse=True)  # lstat: a .dcp link's time is its last save
    try:
        _check_checkpoint(found[0])
    except (OSError, ValueError) as e:
        other = f"; move it away to resume from the older {found[1]}" if len(found) > 1 else ""
        raise ValueError(f"the newest checkpoint {found[0]} cannot be read ({e}){other}") from None
    return found[0]


def resolve_checkpoint(path: str | os.PathLike, prefer: tuple[str, ...] = ("best", "checkpoint")) -> Path:
    """The checkpoint ``path`` names: a checkpoint file or DCP folder as it is; a run folder (``runs/x``) ->
    :func:`find_checkpoint` of the first stem of ``prefer`` it holds (``best.pt`` before ``checkpoint.pt`` by
    default: what evaluation wants). FileNotFoundError naming the path and the stems looked for."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir() or (path / _TRAINER_FILE).exists() or (path / _METADATA_FILE).exists():
        return path
    for stem in prefer:
        if any((path / f"{stem}{ext}").exists() for ext in (".pt", ".dcp")):
            return find_checkpoint(path, stem)
    raise FileNotFoundError(f"{path} is a folder without a checkpoint (looked for "
                            + ", ".join(f"{stem}.pt, {stem}.dcp" for stem in prefer) + ")")


def _check_checkpoint(path: Path) -> None:
    """Raise (naming the file) unless ``path`` looks like a checkpoint of this module: a torch.save file, or a
    DCP folder with ``trainer.pt`` and a ``.metadata`` of allowed classes (read; the tensors are not)."""
    from onerec_fast.train.dcp_reader import read_metadata

    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"{path} is neither a file nor a folder")
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a checkpoint (not a file written by torch.save)")
        return
    if not zipfile.is_zipfile(path / _TRAINER_FILE):
        raise ValueError(f"{path} is not a checkpoint folder of onerec_fast (no readable {_TRAINER_FILE})")
    read_metadata(path / _METADATA_FILE)


# --------------------------------------------------------------------------------------------- training state
def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_training_state(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        extra: dict) -> Path:
    """Save ``model`` (plain, DDP's module or FSDP2-sharded), ``optimizer``, ``extra`` (tensors, numbers,
    strings) and the RNG states atomically at ``path``: a file in one process, a DCP folder (a link to the
    newest version) in a process group, where every rank must call this. A model with a non-finite parameter
    raises ValueError (on every rank) and writes nothing: the previous checkpoint stays."""
    _check_finite_parameters(model, path)
    state = {**extra, "rng": rng_state()}
    if not is_distributed():
        return save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state})
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    rank = dist_info().rank
    final = path.with_name(f"{path.name}.version-{broadcast_object(uuid.uuid4().hex[:12])}")
    tmp = final.with_name(final.name + ".tmp")
    # get_state_dict initializes an empty optimizer state by a zero-lr step; a resume must not count it.
    state["optimizer_initialized"] = bool(optimizer.state)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if not state["optimizer_initialized"]:
        optimizer.state.clear()
    tensors = {"model": model_sd, "optimizer": optim_sd}
    _experts_as_dtensors(model, tensors)
    dcp.save(tensors, checkpoint_id=tmp)
    if rank == 0:
        save_checkpoint(tmp / _TRAINER_FILE, state)
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        os.replace(tmp, final)
        link = path.with_name(f".{path.name}.link")
        if link.is_symlink():
            link.unlink()
        link.symlink_to(final.name)
        os.replace(link, path)  # the switch to the new version: atomic
        version = re.compile(re.escape(path.name) + r"\.version-[0-9a-f]{12}(\.tmp)?")
        for old in path.parent.iterdir():  # earlier versions, and folders of saves that crashed
            if old != final and version.fullmatch(old.name) and old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
    dist.barrier()
    return path


def _check_finite_parameters(model: torch.nn.Module, path) -> None:
    """ValueError naming the first parameter of ``model`` with a NaN or inf (this rank's shard; in a process group
    the verdict is summed over the ranks, so all of them raise)."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    bad = next((name for name, p in params.items()
                if not bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())), None)
    any_bad = bad is not None
    if is_distributed():
        device = next(iter(params.values())).device if params else "cpu"
        any_bad = bool(all_reduce_sum(torch.tensor(float(any_bad), device=device)))
    if any_bad:
        where = f"parameter {bad!r}" if bad is not None else "a parameter on another rank"
        raise ValueError(f"not saving {path}: {where} holds NaN or inf; the previous checkpoint is kept")


def load_training_state(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        validate: Callable[[dict], None] | None = None) -> dict:
    """Load what :func:`save_training_state` wrote (either kind, any world size) into ``model`` and
    ``optimizer``, restore the RNG states and return the other entries. ``validate(entries)`` runs before
    anything is loaded (to refuse an incompatible checkpoint). In a process group every rank must call this."""
    path = Path(path)
    if path.is_dir():
        extra = _read_trainer_file(path)
        if validate is not None:
            validate(extra)
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)  # templates: this run's shapes and shards
        state = {"model": model_sd, "optimizer": optim_sd}
        _experts_as_dtensors(model, state)
        _dcp_load(state, path)
        for entries, key, _ in _expert_entries(model, state):
            entries[key] = entries[key].to_local()
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if not extra.pop("optimizer_initialized", True):
            optimizer.state.clear()
    else:
        ck = load_checkpoint(path)
        extra = {k: v for k, v in ck.items() if k not in ("model", "optimizer")}
        if validate is not None:
            validate(extra)
        if _is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(model, optimizer, model_state_dict=ck["model"],
                           optim_state_dict=_optim_state_by_name(ck["optimizer"], model, optimizer),
                           options=StateDictOptions(full_state_dict=True))
        else:
            _experts_of_rank(ck, model, optimizer)
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
    set_rng_state(extra["rng"])
    return extra


def _param_names_by_index(osd: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """The parameter numbers of ``optimizer.state_dict()`` ``osd`` (param-group order) -> ``model``'s names."""
    names = {id(p): n for n, p in model.named_parameters()}
    by_index = {}
    if len(osd["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(osd['param_groups'])} parameter groups, "
                         f"this one {len(optimizer.param_groups)}")
    for saved, group in zip(osd["param_groups"], optimizer.param_groups):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError("the checkpoint's optimizer groups hold other parameters than this model's")
        by_index.update({i: names[id(p)] for i, p in zip(saved["params"], group["params"])})
    return by_index


def _optim_state_by_name(osd: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` (parameters numbered in param-group order) -> the same keyed by parameter
    name, the layout ``set_state_dict`` takes."""
    by_index = _param_names_by_index(osd, model, optimizer)
    return {"state": {by_index[i]: s for i, s in osd["state"].items()},
            "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in osd["param_groups"]]}


def _expert_entries(model: torch.nn.Module, state: dict):
    """``(dict, key, layer)`` of every tensor of an expert-parallel weight of ``model`` in ``state`` (``"model"``
    and ``"optimizer"`` as ``get_state_dict`` gives them, keyed by name): the weight and its optimizer tensors
    shaped like it (AdamW's moments; not the 0-d ``step``). A parameter's optimizer entries are first copied into
    a new dict: ``get_state_dict`` hands out the optimizer's own, which must not change."""
    optim_state = state["optimizer"]["state"]
    for name, layer in expert_shards(model).items():
        yield state["model"], name, layer
        if name not in optim_state:
            continue
        per_param = optim_state[name] = dict(optim_state[name])
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                yield per_param, key, layer


def _experts_as_dtensors(model: torch.nn.Module, state: dict) -> None:
    """In place: every expert-parallel tensor in ``state`` (this rank's ``[E/P, ...]`` rows) becomes a DTensor
    sharded along dim 0 over its layer's group (global ``[E, ...]``), which DCP saves and loads whole."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    meshes = {}
    for entries, key, layer in _expert_entries(model, state):
        local = entries[key]
        mesh_key = (id(layer.ep_group), local.device.type)
        if mesh_key not in meshes:
            group = layer.ep_group if layer.ep_group is not None else dist.group.WORLD
            meshes[mesh_key] = DeviceMesh.from_group(group, local.device.type)
        entries[key] = DTensor.from_local(local, meshes[mesh_key], [Shard(0)], run_check=False)


def _experts_of_rank(ck: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """In place: the whole ``[E, ...]`` experts of a single-process checkpoint ``ck`` (and their optimizer
    moments) cut to the rows of this rank's expert-parallel layers of ``model``; nothing without such layers."""
    if not expert_shards(model):
        return
    by_index = _param_names_by_index(ck["optimizer"], model, optimizer)
    optim_state = ck["optimizer"]["state"]
    state = {"model": ck["model"], "optimizer": {"state": {by_index[i]: s for i, s in optim_state.items()}}}
    for entries, key, layer in _expert_entries(model, state):
        rows = layer.local_experts
        entries[key] = entries[key][rows.start:rows.stop]
    ck["optimizer"]["state"] = {i: state["optimizer"]["state"][by_index[i]] for i in optim_state}


def _read_trainer_file(folder: Path) -> dict:
    f = folder / _TRAINER_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder of onerec_fast (no {_TRAINER_FILE})")
    return _load_file(f)


def _read_dcp_model(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict of a DCP folder, on CPU (templates from the folder's metadata)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from onerec_fast.train.dcp_reader import read_metadata

    meta = read_metadata(folder / _METADATA_FILE)
    template = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in meta.state_dict_metadata.items()
                if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    state = {"model": template}
    _dcp_load(state, folder)
    return state["model"]


def _dcp_load(state: dict, folder: Path) -> None:
    """``dcp.load`` into ``state`` in place (collective in a process group, else read by this process alone),
    through the restricted reader and planner of :mod:`onerec_fast.train.dcp_reader`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from onerec_fast.train.dcp_reader import SafeLoadPlanner, SafeReader, UnsafeCheckpointError, read_metadata

    read_metadata(folder / _METADATA_FILE)  # a refused .metadata raises here as itself, not wrapped by dcp.load
    with warnings.catch_warnings():  # one process reading a checkpoint of many ranks is what is meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            dcp.load(state, storage_reader=SafeReader(str(folder)), planner=SafeLoadPlanner(folder))
        except CheckpointException as e:  # a BaseException holding every rank's error: raise a refusal plainly
            refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UnsafeCheckpointError)]
            if refused:
                raise refused[0] from None
            raise
