"""Where runs and sweeps live: a local folder, or a URI that pyarrow's filesystems take (s3://, gs://...)."""

from __future__ import annotations

from pathlib import Path

from sdetr.platform.layout import write_text_atomic


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class RunStorage:
    """``<storage>/<name>``: a local folder, or a URI that pyarrow's filesystems take (s3://, gs://...)."""

    def __init__(self, storage: str, name: str):
        self.name = name
        if is_uri(storage):
            import pyarrow.fs  # only object storage needs it

            self.fs, base = pyarrow.fs.FileSystem.from_uri(storage)
            self.storage_path = storage.rstrip("/")
            self.fs_dir = f"{base.rstrip('/')}/{name}"
            self.local: Path | None = None
            self.run_dir = f"{self.storage_path}/{name}"
        else:
            root = Path(storage.removeprefix("file://")).expanduser().resolve()
            self.fs = None
            self.storage_path = str(root)
            self.local = root / name
            self.fs_dir = str(self.local)
            self.run_dir = str(self.local)

    @property
    def root_local(self) -> Path | None:
        return Path(self.storage_path) if self.local is not None else None

    def join(self, rel: str) -> str:
        return f"{self.run_dir}/{rel}"

    def read_text(self, rel: str) -> str | None:
        if self.local is not None:
            path = self.local / rel
            return path.read_text() if path.is_file() else None
        import pyarrow.fs  # only object storage needs it

        path = f"{self.fs_dir}/{rel}"
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        if self.local is not None:
            write_text_atomic(self.local / rel, text)
            return
        self.fs.create_dir(self.fs_dir, recursive=True)
        with self.fs.open_output_stream(f"{self.fs_dir}/{rel}") as f:
            f.write(text.encode())

    def artifact_location(self) -> str:
        """MLflow artifacts next to the runs, on storage every node sees."""
        if self.local is not None:
            return (Path(self.storage_path) / "mlartifacts").as_uri()
        return f"{self.storage_path}/mlartifacts"
