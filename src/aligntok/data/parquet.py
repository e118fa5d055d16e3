"""Hugging Face datasets as data specs: ``hf:NAME[:SPLIT]`` reads a dataset's parquet files as shards.

``NAME`` is a Hub dataset id (``ILSVRC/imagenet-1k``; resolved through huggingface_hub, so
``HF_HUB_OFFLINE=1`` reads the local cache) or a local copy of such a repository (a directory of parquet
files). ``SPLIT`` (default ``train``) selects the files whose path has a folder named ``SPLIT`` or whose
name starts with ``SPLIT-`` / ``SPLIT_`` (the layouts the Hub's parquet conversion and ``datasets`` write).

Each parquet file is one shard of a :class:`~aligntok.data.shards.ShardDataset`, so these datasets stream
like WebDataset shards: files split among ranks and DataLoader workers, a seeded shuffle buffer, exact
resume, one ``cache-latents`` unit per file. Only the needed columns are read, one record batch at a time.
Columns are recognised by name and type: the image (a ``datasets`` Image struct with ``bytes``, or
encoded bytes), the label (an integer column: label, labels, cls, class) and the caption (a string
column: caption, text, txt, prompt). Class names come from the ``datasets`` metadata in the files
(a ClassLabel feature), else the number of classes is the largest label + 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset

from aligntok.data.shards import DEFAULT_SHUFFLE_BUFFER, IMAGE_KEYS, ShardDataset

HF_PREFIX = "hf:"
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "class_id")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt", "captions")
READ_BATCH_ROWS = 64  # rows per record batch read: bounds memory to a few dozen encoded images


def parse_hf_spec(spec: str) -> tuple[str, str]:
    """``hf:NAME[:SPLIT]`` -> (NAME, SPLIT); SPLIT defaults to ``train``."""
    name, _, split = spec.removeprefix(HF_PREFIX).partition(":")
    if not name:
        raise ValueError(f"data spec {spec!r} names no dataset: use hf:ORG/NAME[:SPLIT] or hf:LOCAL_DIR[:SPLIT]")
    return name, split or "train"


def _resolve(name: str, split: str) -> Path:
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, repo_type="dataset", allow_patterns=[f"*{split}*.parquet"]))
    except (OSError, ValueError):
        raise ValueError(
            f"dataset '{name}' is neither a local directory nor downloadable (offline?): on a machine with internet "
            f"run `hf download {name} --repo-type dataset` and copy the Hugging Face cache here, or pass a local copy"
        ) from None


def split_files(root: Path, split: str) -> list[Path]:
    """The parquet files of ``split`` under ``root``, sorted by path."""
    found = []
    for path in sorted(root.rglob("*.parquet")):
        relative = path.relative_to(root)
        if split in relative.parts[:-1] or path.name.startswith((f"{split}-", f"{split}_", f"{split}.")):
            found.append(path)
    return found


def _pick(schema: Any, names: tuple[str, ...], accept: Any) -> str | None:
    by_name = {field.name.lower(): field for field in schema}
    for name in names:
        field = by_name.get(name)
        if field is not None and accept(field.type):
            return field.name
    return None


def _is_image_type(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(kind):
        return kind.get_field_index("bytes") >= 0
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


class HubDataset(ShardDataset):
    """A Hugging Face dataset's parquet files as a :class:`ShardDataset` (see the module doc)."""

    def __init__(
        self, spec: str, resolution: int, *, hflip: bool = False, seed: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    ) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:  # a dependency, but name the fix if an environment lacks it
            raise ValueError("hf: data specs read parquet with pyarrow: pip install pyarrow") from None
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        IterableDataset.__init__(self)
        name, split = parse_hf_spec(spec)
        root = _resolve(name, split)
        files = split_files(root, split)
        if not files:
            raise ValueError(f"dataset '{name}' has no parquet files for split '{split}' (under {root})")
        self.source, self.resolution, self.hflip, self.seed = spec, resolution, hflip, seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.shards = [str(path) for path in files]
        first = pq.ParquetFile(files[0])
        schema = first.schema_arrow
        self.image_column = _pick(schema, IMAGE_COLUMNS, _is_image_type)
        if self.image_column is None:
            raise ValueError(f"{files[0]} has no image column (looked for {', '.join(IMAGE_COLUMNS)} holding bytes)")
        import pyarrow as pa

        self.label_column = _pick(schema, LABEL_COLUMNS, pa.types.is_integer)
        self.caption_column = _pick(schema, CAPTION_COLUMNS, lambda kind: pa.types.is_string(kind) or pa.types.is_large_string(kind))
        self._known_sizes = {os.path.basename(str(p)): pq.ParquetFile(p).metadata.num_rows for p in files}
        self.class_names = _class_names(schema, self.label_column)
        self.num_classes = len(self.class_names) or self._largest_label(files) + 1

    def _largest_label(self, files: list[Path]) -> int:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if self.label_column is None:
            return -1
        largest = [pc.max(pq.read_table(p, columns=[self.label_column]).column(0)).as_py() for p in files]
        return max((v for v in largest if v is not None), default=-1)

    def shard_size(self, path: str) -> int:
        return self._known_sizes[os.path.basename(path)]

    def read_raw(self, path: str) -> Iterator[dict]:
        """Raw samples of one parquet file in row order, in the shape of a WebDataset sample."""
        import pyarrow.parquet as pq

        columns = [c for c in (self.image_column, self.label_column, self.caption_column) if c is not None]
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                raw = {"__key__": f"{row:09d}", "__url__": path}
                image = record[self.image_column]
                data = image.get("bytes") if isinstance(image, dict) else image
                if data:  # a missing image (or one stored by path only) is a skipped sample
                    raw[IMAGE_KEYS[0]] = data  # any encoded format: the decoder reads the bytes, not the key
                label = record.get(self.label_column) if self.label_column else None
                if label is not None:
                    raw["cls"] = str(label).encode()
                caption = record.get(self.caption_column) if self.caption_column else None
                if caption:
                    raw["txt"] = caption.encode()
                yield raw
                row += 1


def _class_names(schema: Any, label_column: str | None) -> list[str]:
    """ClassLabel names from the ``datasets`` metadata parquet files carry (key b"huggingface"), if any."""
    metadata = schema.metadata or {}
    if label_column is None or b"huggingface" not in metadata:
        return []
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
    except (KeyError, ValueError, TypeError):
        return []
    feature = features.get(label_column, {}) if isinstance(features, dict) else {}
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else []


def is_hf_spec(spec: str) -> bool:
    return spec.startswith(HF_PREFIX)
