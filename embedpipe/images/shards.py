"""WebDataset tar shards, streamed front to back into :class:`~.streams.Sample` rows.

A shard is a tar archive whose consecutive members that share a key form a sample
(``dir/abc.jpg`` and ``dir/abc.cls`` are the image and label of key ``dir/abc``). It is
read once, in order, with the standard library's ``tarfile`` in stream mode: no
extraction to disk, no seeking (object storage serves it as one GET), memory bounded by
one sample. A shard named ``*.tar.gz``/``*.tgz`` (or any compression ``tarfile`` detects)
streams the same way.

Every problem becomes a failure row, never an exception: a sample without an image, a
key seen earlier in the shard, an empty image, a shard cut short or corrupt, a shard that
cannot be opened. Key ``""`` stands for the shard itself: a shard that cannot be opened,
or one that broke before its first member (or inside a sample an earlier run finished).
"""

from __future__ import annotations

import fnmatch
import json
import lzma
import os
import re
import tarfile
import zlib
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import unquote

from ..errors import SourceError
from ..uris import is_uri, join, list_files, resolve
from .decode import DecodeFailure, ErrorType
from .sources import IMAGE_EXTENSIONS
from .streams import Sample

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: extensions (last dot-segment) of a sample's image member, the preferred first
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
#: extensions of the members a label is read from, the preferred first
LABEL_MEMBERS = ("cls", "json", "txt")
#: the errors of a stream that breaks: cut short, corrupt headers or compressed data
_BROKEN = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
_GLOB = re.compile(r"[*?\[]")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_MISSING_SHOWN = 5


# --- naming shards: files, folders, brace patterns, globs ------------------------------


def _is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def _text(spec: str | os.PathLike) -> str:
    """A URI as written; a local path made absolute, so that ids do not depend on the
    working directory."""
    return spec if is_uri(spec) else os.path.abspath(os.fspath(spec))


def _expand_braces(pattern: str) -> list[str]:
    """Bash-style ``{a,b}`` alternatives and ``{0008..0011}`` ranges, nested or several:
    every name the pattern spells, in order. A range pads to the wider bound when
    either bound has a leading zero (``{08..10}`` -> 08, 09, 10), as bash does; a group
    with neither ``,`` nor ``..`` is literal text."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise SourceError(f"shard pattern {pattern!r} opens a '{{' that it never closes")
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    if m := _RANGE.fullmatch(body):
        a, b = m.groups()
        width = max(len(a), len(b)) if a[0] == "0" or b[0] == "0" else 0
        lo, hi = sorted((int(a), int(b)))
        choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        choices, depth, last = [], 0, 0
        for i, ch in enumerate(body):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                choices.append(body[last:i])
                last = i + 1
        if not choices:
            return [head + "{" + body + "}" + rest for rest in _expand_braces(tail)]
        choices.append(body[last:])
    return [name for c in choices for name in _expand_braces(head + c + tail)]


def _matches(path: Sequence[str], pattern: Sequence[str]) -> bool:
    """Path segments against glob segments: ``*``, ``?`` and ``[...]`` stay within one
    segment, ``**`` spans any number of them (as ``glob(recursive=True)``)."""
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_matches(path[i:], pattern[1:]) for i in range(len(path) + 1))
    head = bool(path) and fnmatch.fnmatchcase(path[0], pattern[0])
    return head and _matches(path[1:], pattern[1:])


def _files_below(folder: str) -> Iterator[str]:
    """Posix paths, relative to ``folder`` (a local path or a URI), of every file below it.
    Local symlinked folders are not followed, so a link loop cannot trap the walk."""
    if is_uri(folder):
        yield from (rel for rel, _, _ in list_files(folder))
        return
    for dirpath, _, filenames in os.walk(folder, followlinks=False):
        rel = os.path.relpath(dirpath, folder).replace(os.sep, "/")
        yield from (name if rel == "." else f"{rel}/{name}" for name in filenames)


def _child(folder: str, rel: str) -> str:
    return join(folder, rel) if is_uri(folder) else os.path.join(folder, *rel.split("/"))


class _Kinds:
    """'file', 'dir' or None for local paths and URIs; URIs in one folder cost one
    listing of it, not one request each (a thousand shards on S3)."""

    def __init__(self) -> None:
        self._listings: dict[str, dict[str, str]] = {}

    def __call__(self, name: str) -> str | None:
        if not is_uri(name):
            return "dir" if os.path.isdir(name) else "file" if os.path.isfile(name) else None
        parent, _, base = name.rstrip("/").rpartition("/")
        if parent not in self._listings:
            self._listings[parent] = self._list(parent)
        return self._listings[parent].get(unquote(base))

    @staticmethod
    def _list(folder: str) -> dict[str, str]:
        import pyarrow.fs as pafs

        fs, path = resolve(folder)
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/") or "/", allow_not_found=True))
        kinds = {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}
        return {i.base_name: kinds[i.type] for i in infos if i.type in kinds}


def _glob(pattern: str) -> list[str]:
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if _GLOB.search(p))
    base, globs = "/".join(parts[:first]) or "/", parts[first:]
    return [
        _child(base, rel)
        for rel in _files_below(base)
        if _is_shard(rel) and _matches(rel.split("/"), globs)
    ]


def expand_shards(spec: str | os.PathLike) -> list[str]:
    """Every shard ``spec`` names, sorted and without repeats: local paths (absolute) or
    URIs.

    ``spec`` is a shard file (named as given, whatever its suffix), a folder (every
    ``.tar``/``.tar.gz``/``.tgz`` below it), a glob (``shards/*.tar``, ``**`` for any
    depth; only shard files match) or a brace pattern (``shards/{00000..00999}.tar``,
    ``{train,val}/*.tar``) whose names are each one of those. The files and folders a
    brace pattern names must exist: a missing one is an error that names it, not a
    silently smaller job.
    """
    text = _text(spec)
    names = _expand_braces(text)
    kind = _Kinds()
    found: list[str] = []
    missing: list[str] = []
    try:
        for name in names:
            if _GLOB.search(name.partition("://")[2] if is_uri(name) else name):
                found += _glob(name)
            elif (k := kind(name)) == "dir":
                found += [_child(name, rel) for rel in _files_below(name) if _is_shard(rel)]
            elif k == "file":
                found.append(name)
            else:
                missing.append(name)
    except (OSError, ValueError) as e:  # pyarrow: no such bucket, unknown scheme, no access
        raise SourceError(f"cannot list the shards {text!r}: {e}") from None
    if missing and len(names) > 1:
        shown = ", ".join(repr(m) for m in missing[:_MISSING_SHOWN])
        more = len(missing) - _MISSING_SHOWN
        shown += f" and {more} more" if more > 0 else ""
        raise SourceError(
            f"{len(missing)} of the {len(names)} shards that {text!r} names do not exist: {shown}"
        )
    if not found:
        raise SourceError(
            f"no shards match {text!r}: looked for a file, a folder, a glob or a brace "
            f"pattern of files ending in {', '.join(SHARD_SUFFIXES)}"
        )
    return sorted(set(found))


def is_shard_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names tar shards rather than an image folder or a manifest.

    The rule: a name ending in ``.tar``/``.tar.gz``/``.tgz`` is a shard or a brace/glob
    pattern of shards, existing or not (so that a missing one is reported as a missing
    shard); a folder is a shard folder when some file below it is a shard and no file
    below it is an image (any image makes it an image folder, whose tar files are not
    images and are ignored as before). The walk stops at the first image, so an image
    folder costs a listing or two. Anything that cannot be listed is no shard spec.
    """
    text = _text(spec)
    if _is_shard(text):
        return True
    shards = False
    try:
        for rel in _files_below(text):
            if os.path.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
                return False
            shards = shards or _is_shard(rel)
    except (OSError, ValueError):  # not a folder; pyarrow: unknown scheme, no access
        return False
    return shards


def shard_name(shard: str, root: str) -> str:
    """The id prefix of ``shard``: its posix path relative to ``root`` (see
    :func:`~.streams.common_root`) without the shard suffix, e.g. ``train/00042``. Unique among
    the shards of one list, as long as no two differ only by suffix."""
    if is_uri(shard):
        rel = unquote(shard[len(root):].lstrip("/"))
    else:
        rel = os.path.relpath(shard, root).replace(os.sep, "/")
    suffix = next(s for s in (*SHARD_SUFFIXES, "") if rel.lower().endswith(s))
    return rel[: len(rel) - len(suffix)]


# --- reading one shard -----------------------------------------------------------------


class _StrictHeader(tarfile.TarInfo):
    """``tarfile`` takes a header cut short, a missing one or a garbled one after the
    first member for the end of the archive, and stops without a word; a shard cut at
    a member boundary would then look whole. Only the end-of-archive zero block ends a
    shard here; anything else is a break."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(f"{e} at byte {tarfile_.offset}") from None


@dataclass
class _Pending:
    """The sample being read: its members so far, its best image and its label texts."""

    key: str
    skip: bool  # done, or repeated: its members are read past, nothing kept
    members: list[str] = field(default_factory=list)
    image: tuple[tuple[bool, int], str, bytes] | None = None  # (rank, member, data)
    labels: dict[str, bytes] = field(default_factory=dict)

    def add(self, tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str) -> None:
        """Keep what the sample needs of this member; read past the rest."""
        self.members.append(info.name)
        last = ext.rpartition(".")[2]
        # a plain `abc.png` beats `abc.seg.png` (a mask), then jpg before jpeg, png, webp
        rank = ("." in ext, IMAGE_MEMBERS.index(last)) if last in IMAGE_MEMBERS else None
        if not self.skip and rank is not None and (self.image is None or rank < self.image[0]):
            self.image = (rank, info.name, tar.extractfile(info).read())
        elif not self.skip and ext in LABEL_MEMBERS and ext not in self.labels:
            self.labels[ext] = tar.extractfile(info).read()
        # tarfile reads past what is left here when it moves to the next header

    def sample(self) -> Sample:
        label = _label(self.labels)
        if self.image is None:
            return Sample(self.key, self.members[0], label, failure=DecodeFailure(
                ErrorType.NOT_AN_IMAGE,
                f"sample has no image member: it has {', '.join(self.members)}; looked for "
                f"members ending in {', '.join('.' + e for e in IMAGE_MEMBERS)}",
            ))
        _, member, data = self.image
        if not data:
            return Sample(self.key, member, label, failure=DecodeFailure(
                ErrorType.EMPTY_FILE, f"image member {member!r} is empty (0 bytes)"))
        return Sample(self.key, member, label, data=data)


def _label(texts: dict[str, bytes]) -> str | None:
    """The first non-empty of: the ``cls`` text, the ``json`` object's ``label`` (or
    ``cls``) value, the ``txt`` text. A ``json`` member that does not parse gives no
    label (its image is still embedded)."""
    for ext in LABEL_MEMBERS:
        if ext not in texts:
            continue
        if ext == "json":
            try:
                meta = json.loads(texts[ext])
            except ValueError:
                continue
            values = [meta.get(k) for k in ("label", "cls")] if isinstance(meta, dict) else []
            label = next((str(v) for v in values if v is not None), "")
        else:
            label = texts[ext].decode("utf-8", errors="replace").strip()
        if label:
            return label
    return None


def _split(name: str) -> tuple[str, str]:
    """A member name -> (key, extension): everything up to the first dot of the base name,
    and the lower-cased rest; a leading ``./`` (``tar -C dir .``) is no part of the key."""
    while name.startswith("./"):
        name = name[2:]
    head, sep, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return head + sep + stem, ext.lower()


def _open(shard: str) -> IO[bytes]:
    if is_uri(shard):
        fs, path = resolve(shard)
        return fs.open_input_stream(path, compression=None)  # tarfile detects compression
    return open(shard, "rb")


def _unopenable(e: Exception) -> DecodeFailure:
    if isinstance(e, FileNotFoundError):
        return DecodeFailure(ErrorType.NOT_FOUND, f"no such shard: {e}")
    if isinstance(e, PermissionError):
        return DecodeFailure(ErrorType.PERMISSION_DENIED, f"permission denied: {e}")
    return DecodeFailure(ErrorType.UNREADABLE, f"cannot open the shard: {e}")


def read_shard(shard: str, *, done: Container[str] = frozenset()) -> Iterator[Sample]:
    """Every sample of ``shard`` (a local path or URI), in shard order, one row each.

    A sample's image is its member ending in ``.jpg``, ``.jpeg``, ``.png`` or ``.webp``
    (see :data:`IMAGE_MEMBERS`); its label comes from a ``.cls``, ``.json`` or ``.txt``
    member (see :func:`_label`); other members, hidden files (``._abc.jpg``), folders and
    links are passed over. Failure rows: a sample without an image, a key that comes back
    later in the shard (ids stay unique), an empty image. A shard that breaks (cut short,
    corrupt) yields every sample known whole, then one ``truncated`` row keyed by the
    sample being read, or ``""`` (the shard itself) when it broke before its first member;
    a shard that cannot be opened yields one row keyed ``""``. Keys in ``done`` (``""``
    too) are not yielded, and their data is read past.
    """
    try:
        stream = _open(shard)
    except (OSError, ValueError) as e:  # pyarrow: unknown scheme
        if "" not in done:
            yield Sample("", "", None, failure=_unopenable(e))
        return
    seen: set[str] = set()
    pending: _Pending | None = None
    finished = None  # the key of the last sample known whole
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictHeader) as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header it read: memory would grow
                key, ext = _split(info.name)
                if not info.isreg() or not key.rpartition("/")[2]:
                    continue
                if pending is None or key != pending.key:
                    if pending is not None:
                        if not pending.skip:
                            yield pending.sample()
                        finished = pending.key
                    pending = _Pending(key, skip=key in seen or key in done)
                    if key in seen and key not in done:
                        yield Sample(key, info.name, None, failure=DecodeFailure(
                            ErrorType.UNREADABLE,
                            f"key repeated in shard {shard!r}: {key!r} comes back at member "
                            f"{info.name!r}, after other keys; only its first sample is read",
                        ))
                    seen.add(key)
                pending.add(tar, info, ext)
    except _BROKEN as e:
        # A sample is known whole only once a member of another key (or the archive's end)
        # follows it: the one being read fails too, as the break may have cut its label.
        member = pending.members[-1] if pending is not None else ""
        where = "before its first member"
        if pending is not None:
            where = f"while reading key {pending.key!r} (last member {member!r})"
        if finished is not None:
            where = f"after key {finished!r}, {where}"
        key = pending.key if pending is not None and not pending.skip else ""
        if key not in done:
            yield Sample(key, member, None, failure=DecodeFailure(
                ErrorType.TRUNCATED, f"shard {shard!r} broke {where}: {e}"))
        return
    if pending is not None and not pending.skip:
        yield pending.sample()
