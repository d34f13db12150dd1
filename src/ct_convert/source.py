"""Resolve SOURCE (a folder, a .safetensors file, or a Hugging Face repo id) into its SourceFiles."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ct_convert import hub, jsonfile
from ct_convert.errors import InputError
from ct_convert.jsonfile import load_json
from ct_convert.regular_files import require_regular
from ct_convert.tensorstore import MAX_TENSORS, TensorStore, inside

CONFIG_NAMES = ("config.json", "params.json")
# weight files of other formats that never travel into an output folder
FOREIGN_WEIGHTS = (".bin", ".pth", ".pt", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SourceFiles:
    """What SOURCE resolved to: its folder, config.json and tensors, and the files beside them."""

    source: str  # as the user gave it
    root: Path
    config: dict  # the whole config.json (or {} when only safetensors metadata exists)
    config_file: Path | None
    store: TensorStore
    index_file: Path | None
    revision: str | None = None
    weight_files: list[Path] = field(default_factory=list)
    boundary: Path | None = None  # where symlinks may point: the folder itself, or a Hub cache repo
    single_file: bool = False  # SOURCE named one .safetensors file, not its folder


    def protected_paths(self) -> list[Path]:
        """What an OUTPUT must never be, hold or lie in: SOURCE as the user named it, and its Hub cache repo."""
        own = list(self.weight_files) if self.single_file else [self.root]
        return own + ([self.boundary] if self.boundary else [])

    def other_files(self) -> list[Path]:
        """Files to copy into an output folder unchanged: everything but weights, relative to root."""
        skip = {p.resolve() for p in self.weight_files}
        if self.index_file:
            skip.add(self.index_file.resolve())
        if self.config_file:
            skip.add(self.config_file.resolve())
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            # hidden folders and earlier ct-convert outputs (OUTPUT once lay inside SOURCE) never travel
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and not os.path.lexists(os.path.join(dirpath, d, "ct-convert.json"))
            )
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                if fn.startswith(".") or fn.endswith(".safetensors") or fn.endswith(".safetensors.index.json"):
                    continue
                if fn.lower().endswith(FOREIGN_WEIGHTS) or fn == "ct-convert.json":
                    continue
                if p.resolve() in skip or not inside(self.boundary or self.root, p):
                    continue
                require_regular(p)  # a FIFO would hang the copy, /dev/zero would fill the disk
                out.append(p.relative_to(self.root))
        return out


def resolve(source: str, revision: str | None = None, *, headers_only: bool = False) -> SourceFiles:
    path = Path(source).expanduser()
    if path.exists():
        if revision:
            raise InputError(f"{source}: --revision applies to Hugging Face repo ids, not local paths")
        return _local(source, path)
    if REPO_ID.match(source):
        found = hub.resolve_repo(source, revision, headers_only=headers_only)
        if isinstance(found, hub.RemoteHeaders):
            return SourceFiles(source, found.store.root, found.config, None, found.store, None, revision=found.revision, weight_files=[])
        files = _local(source, found.folder, found.boundary)
        files.revision = found.revision
        return files
    raise InputError(f"{source}: no such file or folder, and not a Hugging Face repo id (org/name)")


def _local(source: str, path: Path, boundary: Path | None = None) -> SourceFiles:
    if not path.is_dir():
        require_regular(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: not a .safetensors file or a checkpoint folder")
        root = path.parent
        files = [path]
        index = None
        weight_map = None
    else:
        root = path
        index = find_index(root)
        if index is not None:
            files, weight_map = read_index(root, index, boundary)
        else:
            # transformers reads model.safetensors alone when there is no index; other files beside it
            # (references, adapters) are not part of the model
            single = root / "model.safetensors"
            files = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise InputError(f"{root}: no *.safetensors files in this folder")
    # exists(), not is_file(): a FIFO or device named config.json is refused by load_json, not skipped
    config_file = next((root / n for n in CONFIG_NAMES if (root / n).exists()), None)
    config = load_json(config_file) if config_file else {}
    store = TensorStore(root, files, weight_map)
    if not config:
        config = _config_from_metadata(store, files)
        if not config:
            raise InputError(
                f"{root}: no config.json, and the safetensors metadata holds no quantization_config",
                hint="Put the model's config.json beside the weights.",
            )
    return SourceFiles(
        source, root, config, config_file, store, index, weight_files=files, boundary=boundary, single_file=path.is_file()
    )


def find_index(root: Path) -> Path | None:
    preferred = root / "model.safetensors.index.json"
    if preferred.exists():
        return preferred
    found = sorted(root.glob("*.safetensors.index.json"))
    return found[0] if found else None


def read_index(root: Path, index: Path, boundary: Path | None = None) -> tuple[list[Path], dict[str, Path]]:
    data = load_json(index)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise InputError(f"{index}: no weight_map in the index")
    if len(wm) > MAX_TENSORS:
        raise InputError(
            f"{index}: weight_map lists {len(wm)} tensors, more than the {MAX_TENSORS} ct-convert reads in one checkpoint"
        )
    weight_map: dict[str, Path] = {}
    shards: dict[str, Path] = {}  # each distinct file name is checked once, however many tensors it holds
    for name, rel in wm.items():
        file = shards.get(rel) if isinstance(rel, str) else None
        if file is None:
            file = shards[rel] = _shard(root, index, boundary, name, rel)
        weight_map[name] = file
    files = sorted(set(weight_map.values()))
    return files, weight_map


def _shard(root: Path, index: Path, boundary: Path | None, name: str, rel) -> Path:
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise InputError(f"{index}: tensor {name!r} points to {rel!r}, outside the checkpoint folder")
    file = index.parent / rel
    try:
        if not inside(boundary or root, file):
            raise InputError(f"{index}: tensor {name!r} points to {rel!r}, which leaves the checkpoint folder")
        if not file.exists():
            raise InputError(f"{index}: tensor {name!r} points to {rel!r}, which does not exist")
    except OSError as e:  # a name too long for the file system, a loop of symlinks
        raise InputError(f"{index}: tensor {name!r} points to a file that cannot be opened ({e.strerror or e})") from None
    return file


def _config_from_metadata(store: TensorStore, files: list[Path]) -> dict:
    for f in files:
        md = store.metadata.get(f) or {}
        for key in ("config", "quantization_config"):
            if key in md:
                value = jsonfile.parse(md[key], f"{f}: metadata {key!r}")
                if isinstance(value, dict):
                    return value if key == "config" else {"quantization_config": value}
    return {}
