"""The one storage layer: where runs, sweeps, shards, checkpoints and artifacts live.

A location is a local folder or a URI that pyarrow's filesystems take (``s3://bucket/runs``,
``gs://...``, ``hdfs://...``); both are read and written through a ``pyarrow.fs.FileSystem``, so every
caller works the same on a laptop and on a cluster. Ray Train and Tune take the same URIs (they use
pyarrow too); an S3-API server other than AWS is chosen with ``AWS_ENDPOINT_URL``, and credentials come
from the environment (``AWS_ACCESS_KEY_ID``...), never from the URI or a file of ours.

A location is checked when it is opened (`Location.check`): an unknown scheme or a store that cannot be
reached is a `ConfigError` naming the URI, before anything starts.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from sdetr.detector.errors import ConfigError
from sdetr.platform.layout import DEFAULT_STORAGE, write_text_atomic

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
KNOWN_SCHEMES = "s3://, gs://, hdfs:// (pyarrow's filesystems) or a local folder"


def is_uri(path: str | Path) -> bool:
    """A URI other than ``file://`` (a local folder)."""
    return isinstance(path, str) and bool(_SCHEME.match(path)) and not path.startswith("file://")


class Location:
    """A folder on storage: ``uri`` as the user wrote it (absolute when local), ``fs`` and ``path`` for
    pyarrow, and ``local`` (a `Path`) when it is on this machine's filesystem."""

    def __init__(self, where: str | Path, *, fs: pafs.FileSystem | None = None, path: str | None = None):
        where = str(where)
        if fs is not None:  # a child of an opened location
            self.fs, self.path, self.uri = fs, path, where
            self.local = Path(path) if isinstance(fs, pafs.LocalFileSystem) else None
            return
        if is_uri(where):
            try:
                self.fs, base = pafs.FileSystem.from_uri(where)
            except pa.ArrowInvalid:
                scheme = _SCHEME.match(where).group(1)
                raise ConfigError(
                    f"storage {where}: unknown scheme {scheme!r}; expected {KNOWN_SCHEMES}"
                ) from None
            except (OSError, pa.ArrowException) as exc:
                raise ConfigError(f"storage {where}: cannot open it ({exc})") from None
            self.uri, self.path, self.local = where.rstrip("/"), base.rstrip("/"), None
        else:
            local = Path(where.removeprefix("file://")).expanduser().resolve()
            self.fs, self.path, self.uri, self.local = pafs.LocalFileSystem(), str(local), str(local), local

    @classmethod
    def of(cls, where: str | Path | Location) -> Location:
        return where if isinstance(where, Location) else cls(where)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def child(self, *parts: str) -> Location:
        rel = "/".join(p.strip("/") for p in parts if p)
        return Location(f"{self.uri}/{rel}", fs=self.fs, path=f"{self.path}/{rel}")

    def _p(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    # -- checks ------------------------------------------------------------------------------------
    def check(self, create: bool = False) -> Location:
        """Refuse a store that cannot be reached (or an S3 bucket that does not exist) with one line
        naming the URI; ``create`` makes the folder."""
        try:
            if self.local is None and isinstance(self.fs, pafs.S3FileSystem):
                bucket = self.path.split("/", 1)[0]
                if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise ConfigError(f"storage {self.uri}: bucket {bucket!r} does not exist (create it)")
            if create:
                self.fs.create_dir(self.path, recursive=True)
            else:
                self.fs.get_file_info(self.path)
        except (OSError, pa.ArrowException) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"storage {self.uri}: cannot be reached ({first})") from None
        return self

    # -- files -------------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self._p(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self._p(rel)).type == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self._p(rel)).type == pafs.FileType.Directory

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the sub-folders of ``rel`` (sorted; empty when it does not exist)."""
        if not self.is_dir(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._p(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def list_files(self, rel: str = "") -> list[str]:
        if not self.is_dir(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._p(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def read_bytes(self, rel: str) -> bytes | None:
        if not self.is_file(rel):
            return None
        with self.fs.open_input_stream(self._p(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode("utf-8")

    def read_json(self, rel: str, default: Any = None) -> Any:
        """As `layout.read_json`: ``default`` when the file is missing or torn."""
        try:
            text = self.read_text(rel)
            return default if text is None else json.loads(text)
        except (OSError, ValueError):
            return default

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Local: atomic rename; object stores: a PUT is atomic already (readers see old or new)."""
        if self.local is not None:
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as f:
                f.write(data)
            Path(f.name).replace(target)
            return
        parent = self._p(rel).rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(self._p(rel)) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        if self.local is not None:
            write_text_atomic(self.local / rel, text)
        else:
            self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any, indent: int | None = None) -> None:
        self.write_text(rel, json.dumps(obj, indent=indent))

    def upload(self, local_file: str | Path, rel: str) -> None:
        self.write_bytes(rel, Path(local_file).read_bytes())

    def download(self, rel: str, local_file: str | Path) -> Path:
        data = self.read_bytes(rel)
        if data is None:
            raise FileNotFoundError(f"{self.uri}/{rel}")
        Path(local_file).parent.mkdir(parents=True, exist_ok=True)
        Path(local_file).write_bytes(data)
        return Path(local_file)

    def upload_tree(self, local_dir: str | Path, rel: str = "") -> int:
        """Copy every file under ``local_dir`` to ``rel`` here; returns how many."""
        files = [f for f in sorted(Path(local_dir).rglob("*")) if f.is_file()]
        for f in files:
            self.upload(f, "/".join(p for p in (rel, f.relative_to(local_dir).as_posix()) if p))
        return len(files)

    def open_input(self, rel: str) -> io.RawIOBase:
        return self.fs.open_input_file(self._p(rel))

    def remove(self, rel: str) -> None:
        """Delete the file ``rel`` if it is there."""
        if self.is_file(rel):
            self.fs.delete_file(self._p(rel))

    def parent(self) -> Location:
        """The folder holding this one (of the same filesystem)."""
        path = self.path.rstrip("/").rsplit("/", 1)[0]
        uri = self.uri.rstrip("/").rsplit("/", 1)[0]
        return Location(uri, fs=self.fs, path=path)


def split_file(where: str | Path) -> tuple[Location, str]:
    """``(the folder's Location, the file name)`` of a file given as a path or URI."""
    text = str(where).rstrip("/")
    folder, _, name = text.rpartition("/")
    return Location(folder or "."), name


def sweep_location(storage: str | Path | None, name: str) -> Location:
    """``<storage>/<name>`` of a sweep (storage: a folder or URI, default ./runs)."""
    return Location(storage or DEFAULT_STORAGE).child(name)


class RunStorage:
    """``<storage>/<name>`` of a Ray Train run: a local folder, or a URI that pyarrow's filesystems take.

    ``storage_path`` and ``name`` are what Ray Train's ``RunConfig`` gets; ``run_dir`` is the run's
    folder or URI; ``local`` its `Path` when it is on this machine's filesystem (else None).
    """

    def __init__(self, storage: str | Path, name: str):
        self.name = name
        self.root = Location(storage)
        self.location = self.root.child(name)
        self.fs = self.root.fs
        self.storage_path = self.root.uri
        self.fs_dir = self.location.path
        self.local = self.location.local
        self.run_dir = self.location.uri

    @property
    def root_local(self) -> Path | None:
        return self.root.local

    def join(self, rel: str) -> str:
        return f"{self.run_dir}/{rel}"

    def read_text(self, rel: str) -> str | None:
        return self.location.read_text(rel)

    def write_text(self, rel: str, text: str) -> None:
        self.location.write_text(rel, text)

    def artifact_location(self) -> str:
        """MLflow artifacts next to the runs, on storage every node sees."""
        if self.root.local is not None:
            return self.root.local.joinpath("mlartifacts").as_uri()
        return f"{self.storage_path}/mlartifacts"
