"""Hugging Face repo ids as sources, through huggingface_hub: the local cache first (always, and only,
when HF_HUB_OFFLINE=1), else a download of the files a conversion needs. Nothing from the repo is
ever imported or executed: only JSON and safetensors are read.

`inspect` on a repo that is not cached reads config.json and the safetensors headers over HTTP
(plus tiny tensors such as `weight_shape` by range request), never the weights, and gives up after
CT_CONVERT_HUB_TIMEOUT seconds (default 120) on each: huggingface_hub retries a timed-out metadata
request once with a fixed 60 s timeout, so a server that accepts connections and then stalls
would otherwise hold `inspect` for minutes whatever HF_HUB_ETAG_TIMEOUT says.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from ct_convert import jsonfile
from ct_convert.errors import InputError, note_reading
from ct_convert.tensorstore import DTYPES, HeaderIndex, TensorMeta

# weights of other formats and editor debris are never fetched
IGNORE = ["*.bin", "*.pth", "*.pt", "*.gguf", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.ot", "original/*"]
SMALL_TENSOR_BYTES = 4096


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _client_errors() -> tuple[type[BaseException], ...]:
    """What a failing server or network raises through huggingface_hub: its HTTP errors, OSError, and
    the transport errors (timeouts, truncated bodies) of the HTTP client it is built on, whose root
    class HfHubHTTPError also derives from (httpx2 in huggingface_hub 2.x, requests' OSError before)."""
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError, SafetensorsParsingError

    return (OSError, NotASafetensorsRepoError, SafetensorsParsingError, *HfHubHTTPError.__bases__)


def _summary(e: BaseException) -> str:
    """The exception's type and first line (huggingface_hub's HTTP errors run to several lines)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _hub_timeout() -> float:
    raw = os.environ.get("CT_CONVERT_HUB_TIMEOUT", "120")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise InputError(f"CT_CONVERT_HUB_TIMEOUT={raw!r}: expected a positive number of seconds")
    return value


def _bounded(what: str, fn, *args):
    """fn(*args) in a daemon thread, abandoned (the process exits all the same) if it has not
    finished within CT_CONVERT_HUB_TIMEOUT seconds."""
    limit = _hub_timeout()
    done: dict = {}

    def run():
        try:
            done["value"] = fn(*args)
        except BaseException as e:  # re-raised in the caller's thread
            done["error"] = e

    worker = threading.Thread(target=run, name="ct-hub", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        raise InputError(f"{what}: the Hugging Face Hub did not answer within {limit:g} s",
                         hint="Check the network and HF_ENDPOINT; CT_CONVERT_HUB_TIMEOUT sets this limit.")
    if "error" in done:
        raise done["error"]
    return done["value"]


@dataclass
class Snapshot:
    """A repo's files on disk (cached or just downloaded)."""

    folder: Path
    boundary: Path  # where its symlinks may point: the repo's cache folder
    revision: str | None  # the commit the snapshot holds


@dataclass
class RemoteHeaders:
    """A repo not downloaded: its config.json and its tensors' headers, at one commit."""

    store: "RemoteStore"
    config: dict
    revision: str  # the commit every read asks for


def resolve_repo(repo_id: str, revision: str | None, *, headers_only: bool) -> Snapshot | RemoteHeaders:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        NotASafetensorsRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # its retry warnings would add lines to ours; what finally failed is in our one-line error
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
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
            return _bounded(repo_id, _remote_headers, repo_id, revision)
        folder = snapshot_download(repo_id, revision=revision, ignore_patterns=IGNORE)
    except RepositoryNotFoundError:
        raise InputError(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private)",
                         hint="Check the name, or log in with `hf auth login` for a private repo.") from None
    except RevisionNotFoundError:
        raise InputError(f"{repo_id}: no revision {revision!r}") from None
    except NotASafetensorsRepoError:
        raise InputError(f"{repo_id}: no model.safetensors or model.safetensors.index.json in this repo") from None
    except _client_errors() as e:
        raise InputError(f"{repo_id}: cannot fetch from the Hugging Face Hub: {_summary(e)}",
                         hint="Check the network, or set HF_HUB_OFFLINE=1 to use the cache only.") from None
    return _snapshot(folder, revision)


def _snapshot(folder: str, revision: str | None) -> Snapshot:
    p = Path(folder)
    # snapshots/<sha>/ files are symlinks into the repo's blobs/: trust that repo folder, no further
    boundary = p.parent.parent if p.parent.name == "snapshots" else p
    # a snapshot folder is named by its commit hash: record it, whatever ref the user gave
    return Snapshot(p, boundary, p.name or revision)


class RemoteStore(HeaderIndex):
    """Tensor headers of a Hub repo at one commit, read without downloading weights; tiny tensors
    are fetched by HTTP range requests of exactly their bytes."""

    def __init__(self, repo_id: str, commit: str):
        from huggingface_hub import get_safetensors_metadata

        self.repo_id = repo_id
        self.revision = commit
        meta = get_safetensors_metadata(repo_id, revision=commit)
        self.root = Path(repo_id)
        self.files = sorted(Path(f) for f in meta.files_metadata)
        self.metadata = {Path(f): (m.metadata or {}) for f, m in meta.files_metadata.items()}
        self._meta: dict[str, TensorMeta] = {}
        for fname, fm in meta.files_metadata.items():
            for name, info in fm.tensors.items():
                if info.dtype not in DTYPES:
                    raise InputError(f"{repo_id}/{fname}: tensor {name!r} has unsupported dtype {info.dtype}")
                self._meta[name] = TensorMeta(Path(fname), info.dtype, tuple(info.shape), tuple(info.data_offsets))
        self._data_start: dict[Path, int] = {}

    def get(self, name: str):
        import torch

        m = self.meta(name)
        if m.nbytes > SMALL_TENSOR_BYTES:
            raise InputError(f"{self.repo_id}: reading {name} would download weights", hint=f"Run `hf download {self.repo_id}` first.")
        if m.file not in self._data_start:
            (n,) = struct.unpack("<Q", self._range(m.file, 0, 8))
            self._data_start[m.file] = 8 + n
        raw = self._range(m.file, self._data_start[m.file] + m.offsets[0], m.nbytes)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(DTYPES[m.dtype][0]).reshape(m.shape)

    def _range(self, file: Path, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of a repo file, by one range request (as huggingface_hub
        reads safetensors headers); a server that answers anything else is refused."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        if length == 0:
            return b""
        where = f"{self.repo_id}/{file}"
        note_reading(where)
        headers = {**build_hf_headers(), "Range": f"bytes={start}-{start + length - 1}"}
        url = hf_hub_url(self.repo_id, str(file), revision=self.revision)
        try:
            r = _bounded(where, lambda: get_session().get(url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT))
            hf_raise_for_status(r)
            raw = r.content
        except _client_errors() as e:
            raise InputError(f"{where}: cannot read bytes {start}-{start + length - 1} from the Hub: {_summary(e)}") from None
        if r.status_code != 206 or len(raw) != length:
            raise InputError(f"{where}: asked the Hub for {length} bytes at {start}, got {len(raw)} (HTTP {r.status_code})")
        return raw

    def close(self) -> None:
        pass


def _remote_headers(repo_id: str, revision: str | None) -> RemoteHeaders:
    from huggingface_hub import hf_hub_download

    config_path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    # the cache keeps files under snapshots/<commit>/: every later read asks for that same commit,
    # so a branch that moves while we read cannot mix two revisions
    commit = config_path.parent.name
    config = jsonfile.parse(config_path.read_bytes(), f"{repo_id}/config.json")
    if not isinstance(config, dict):
        raise InputError(f"{repo_id}/config.json: expected a JSON object")
    return RemoteHeaders(RemoteStore(repo_id, commit), config, commit)
