"""Reading a torch.distributed.checkpoint (DCP) folder without running code from it.

torch's own reader unpickles the folder's ``.metadata`` with plain :mod:`pickle` and loads every non-tensor entry
(an optimizer's ``lr``, ``betas``, ``params``) with ``torch.load(weights_only=False)``: a planted ``.metadata`` or
entry runs arbitrary code on load. :class:`SafeReader` unpickles ``.metadata`` with :class:`MetadataUnpickler`,
which resolves only the classes torch writes there (the dataclasses of ``torch.distributed.checkpoint.metadata``,
``_StorageInfo``, ``torch.Size``, dtypes, layouts, paths) and refuses any other global before it is called, and
checks that every storage file it names lies inside the folder; :class:`SafeLoadPlanner` loads the non-tensor
entries with ``weights_only=True`` (tensors, numbers, strings, containers). Both raise :class:`UnsafeCheckpointError`
naming the file (and the entry) they refused. Tensors are read by torch with ``weights_only=True`` already.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

__all__ = ["UnsafeCheckpointError", "MetadataUnpickler", "SafeReader", "SafeLoadPlanner", "read_metadata",
           "weights_only_reason"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Every global a .metadata written by dcp.save (torch 2.x, FileSystemWriter) refers to, besides the dtypes.
_METADATA_GLOBALS = frozenset({
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name ("torch.strided")
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
})


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds something that loading it could execute (or that no onerec_fast run writes)."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata``: resolves only the globals torch writes there (see the module docstring);
    any other raises :class:`pickle.UnpicklingError` before anything is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not one that DCP metadata holds")


def weights_only_reason(error: Exception) -> str:
    """What torch's ``weights_only`` refusal ``error`` refused (e.g. ``Trying to load unsupported GLOBAL
    posix.system ...``), without its advice to load with ``weights_only=False``."""
    lines = [line.strip() for line in str(error).splitlines()]
    said = [line.partition("WeightsUnpickler error: ")[2] or line for line in lines
            if "GLOBAL" in line or "Unsupported" in line]
    return next((line for line in said if line), lines[0] if lines else type(error).__name__)


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The :class:`Metadata` of the DCP ``.metadata`` file ``path``, read by :class:`MetadataUnpickler`;
    :class:`UnsafeCheckpointError` naming the file when it holds anything else, or names a storage file outside
    its folder."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise UnsafeCheckpointError(f"{path}: not DCP metadata that onerec_fast can read safely ({e}); "
                                    "refusing to load it") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or Path(relative).name != relative or relative in ("", ".", ".."):
            raise UnsafeCheckpointError(f"{path}: names the storage file {relative!r}, which is not a file of "
                                        "its folder")
    return metadata


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through :func:`read_metadata` (pass it to ``dcp.load`` as
    ``storage_reader``, with :class:`SafeLoadPlanner`)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(self._get_metadata_path(kwargs.get("rank")))
        if metadata.storage_meta is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor entries with ``weights_only=True``; ``folder`` names the
    checkpoint in the error raised for an entry holding anything else."""

    def __init__(self, folder: str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
        self.folder = Path(folder)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"{self.folder}: entry {read_item.dest_index.fqn!r} holds more than "
                                        "tensors, numbers and strings; refusing to load it "
                                        f"({weights_only_reason(e)})") from None
        # the rest of DefaultLoadPlanner.load_bytes, with the value loaded above
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
