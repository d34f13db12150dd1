"""Hugging Face repo ids as sources, through huggingface_hub: the local cache first (always, and only,
when HF_HUB_OFFLINE=1), else a download of the files a conversion needs. Nothing from the repo is
ever imported or executed: only JSON and safetensors are read.

`inspect` on a repo that is not cached reads config.json and the safetensors headers over HTTP
(plus tiny tensors such as `weight_shape` by range request), never the weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ct_convert.errors import InputError
from ct_convert.tensorstore import DTYPES, HeaderIndex, TensorMeta

# weights of other formats and editor debris are never fetched
IGNORE = ["*.bin", "*.pth", "*.pt", "*.gguf", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.ot", "original/*"]
SMALL_TENSOR_BYTES = 4096


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@dataclass
class Snapshot:
    """A repo's files on disk (cached or just downloaded)."""

    folder: Path
    boundary: Path  # where its symlinks may point: the repo's cache folder
    revision: str | None  # the commit the snapshot holds


@dataclass
class RemoteHeaders:
    """A repo not downloaded: its config.json and its tensors' headers."""

    store: "RemoteStore"
    config: dict


def resolve_repo(repo_id: str, revision: str | None, *, headers_only: bool) -> Snapshot | RemoteHeaders:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True, ignore_patterns=IGNORE)
        if any(Path(folder).glob("*.safetensors")):
            return _snapshot(folder, revision)
    except LocalEntryNotFoundError:
        pass
    if _offline():
        raise InputError(
            f"{repo_id}: not in the Hugging Face cache{f' at revision {revision}' if revision else ''}, and HF_HUB_OFFLINE is set",
            hint=f"Run `hf download {repo_id}` while online, or unset HF_HUB_OFFLINE.",
        )
    try:
        if headers_only:
            return _remote_headers(repo_id, revision)
        folder = snapshot_download(repo_id, revision=revision, ignore_patterns=IGNORE)
    except RepositoryNotFoundError:
        raise InputError(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private)",
                         hint="Check the name, or log in with `hf auth login` for a private repo.") from None
    except RevisionNotFoundError:
        raise InputError(f"{repo_id}: no revision {revision!r}") from None
    except (HfHubHTTPError, OSError) as e:
        raise InputError(f"{repo_id}: cannot reach the Hugging Face Hub: {e}",
                         hint="Check the network, or set HF_HUB_OFFLINE=1 to use the cache only.") from None
    return _snapshot(folder, revision)


def _snapshot(folder: str, revision: str | None) -> Snapshot:
    p = Path(folder)
    # snapshots/<sha>/ files are symlinks into the repo's blobs/: trust that repo folder, no further
    boundary = p.parent.parent if p.parent.name == "snapshots" else p
    # a snapshot folder is named by its commit hash: record it, whatever ref the user gave
    return Snapshot(p, boundary, p.name or revision)


class RemoteStore(HeaderIndex):
    """Tensor headers of a Hub repo, read without downloading weights."""

    def __init__(self, repo_id: str, revision: str | None):
        from huggingface_hub import get_safetensors_metadata

        self.repo_id = repo_id
        self.revision = revision
        meta = get_safetensors_metadata(repo_id, revision=revision)
        self.root = Path(repo_id)
        self.files = sorted(Path(f) for f in meta.files_metadata)
        self.metadata = {Path(f): (m.metadata or {}) for f, m in meta.files_metadata.items()}
        self._meta: dict[str, TensorMeta] = {}
        for fname, fm in meta.files_metadata.items():
            for name, info in fm.tensors.items():
                if info.dtype not in DTYPES:
                    raise InputError(f"{repo_id}/{fname}: tensor {name!r} has unsupported dtype {info.dtype}")
                self._meta[name] = TensorMeta(Path(fname), info.dtype, tuple(info.shape), tuple(info.data_offsets))
        self._header_len = {Path(f): None for f in meta.files_metadata}

    def get(self, name: str):
        import struct

        import torch
        from huggingface_hub import HfFileSystem

        m = self.meta(name)
        if m.nbytes > SMALL_TENSOR_BYTES:
            raise InputError(f"{self.repo_id}: reading {name} would download weights", hint=f"Run `hf download {self.repo_id}` first.")
        fs = HfFileSystem()
        path = f"{self.repo_id}@{self.revision}/{m.file}" if self.revision else f"{self.repo_id}/{m.file}"
        with fs.open(path, "rb", block_size=0) as f:
            if self._header_len[m.file] is None:
                self._header_len[m.file] = struct.unpack("<Q", f.read(8))[0]
            f.seek(8 + self._header_len[m.file] + m.offsets[0])
            raw = f.read(m.nbytes)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(DTYPES[m.dtype][0]).reshape(m.shape)

    def close(self) -> None:
        pass


def _remote_headers(repo_id: str, revision: str | None) -> RemoteHeaders:
    from huggingface_hub import hf_hub_download

    config_path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{repo_id}/config.json: invalid JSON: {e}") from None
    return RemoteHeaders(RemoteStore(repo_id, revision), config)
