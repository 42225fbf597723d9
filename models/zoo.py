"""The model zoo: the official Segmenter and DEPICT releases by name, downloaded on first use.

``zoo_path("seg-s-mask-ade20k")`` returns a release folder (``checkpoint.pth`` + ``variant.yml``)
that ``load_model`` reads; the CLI takes ``zoo:NAME`` wherever a checkpoint path goes. Nothing is
downloaded until a zoo model is named.

Cache: ``$DEPICT_ANALYSIS_CACHE/zoo/<name>/`` (default ``~/.cache/depict-analysis``). A file is
streamed to ``<file>.part``, resumed with an HTTP ``Range`` request after a cut connection, and
renamed to its final name only once complete, under a lock so that two processes never fetch the
same entry at once. ``<name>/manifest.json`` records each file's size and sha256 at its first
download; every later use checks them again and refuses a file that changed.

Without a network: download a release elsewhere, then ``import_release(NAME, FOLDER)`` (``depict zoo
import``) copies it into the cache, checked against the published sha256 where the registry has one
and against what the manifest recorded before; or pass the release folder itself wherever a
checkpoint goes. A release whose files were copied into its cache folder by hand is taken as it is
(and recorded) on first use: nothing is downloaded over files already there.

Segmenter publishes direct links. DEPICT publishes two Google Drive shared folders (one for
DEPICT-SA, one for DEPICT-CA), each holding one release folder per backbone, e.g.
``DEPICT-SA-Small``: name one as ``zoo:depict-sa/DEPICT-SA-Small``. Drive needs its own client,
``gdown`` (``pip install depict-analysis[zoo]``), imported only when such an entry is fetched.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from filelock import FileLock
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from depict_analysis.models.checkpoint import CheckpointError

CACHE_ENV = "DEPICT_ANALYSIS_CACHE"
MANIFEST = "manifest.json"
RELEASE_FILES = ("checkpoint.pth", "variant.yml")  # what load_model needs in a release folder
CHUNK = 1 << 20
TIMEOUT_S = 60.0  # seconds without a byte before a connection counts as cut
USER_AGENT = "depict-analysis"

# progress(file, bytes so far, total bytes or None)
ProgressCallback = Callable[[str, int, "int | None"], None]


class ZooError(CheckpointError):
    """A zoo model that cannot be named, fetched or verified; the message is one line for the user."""


class ZooUnreachable(ZooError):
    """The host of a release cannot be reached (offline, a firewall, a quota): ``zoo_path`` adds the
    routes that need no network."""


def offline_routes(name: str) -> str:
    """What to do when a release cannot be downloaded here (one line, appended to the error)."""
    return (f"without a network, download the release elsewhere, then either register it with "
            f"`depict zoo import {name} FOLDER` (Python: zoo.import_release) or pass the release folder "
            f"(checkpoint.pth + variant.yml) itself wherever a checkpoint goes")


@dataclass(frozen=True)
class ZooEntry:
    """One zoo name: a release with direct file links (``files``), or a Drive folder of releases (``drive_folder``)."""

    title: str  # as the paper or README names it
    family: str  # decoder family: depict_sa | depict_ca | mask_transformer | linear
    backbone: str
    dataset: str
    miou: tuple[float, float] | None = None  # published val mIoU (%), single-scale / multi-scale
    files: dict[str, str] = field(default_factory=dict)  # file name -> direct URL
    drive_folder: str | None = None  # a Google Drive shared folder holding one folder per release
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> hash, where the publisher gives one


_SEGMENTER = "https://www.rocq.inria.fr/cluster-willow/rstrudel/segmenter/checkpoints"


def _segmenter(title: str, family: str, backbone: str, dataset: str, folder: str, miou: tuple[float, float]) -> ZooEntry:
    """A Segmenter release: its README links checkpoint.pth, variant.yml and log.txt under ``folder``."""
    files = {name: f"{_SEGMENTER}/{folder}/{name}" for name in ("checkpoint.pth", "variant.yml", "log.txt")}
    return ZooEntry(title, family, backbone, dataset, miou, files)


# The published releases: rstrudel/segmenter README "Model Zoo" and QishuaiWen/DEPICT README "Models".
REGISTRY: dict[str, ZooEntry] = {
    "seg-t-mask-ade20k": _segmenter("Seg-T-Mask/16", "mask_transformer", "ViT-T/16", "ade20k", "ade20k/seg_tiny_mask", (38.1, 38.8)),
    "seg-s-mask-ade20k": _segmenter("Seg-S-Mask/16", "mask_transformer", "ViT-S/16", "ade20k", "ade20k/seg_small_mask", (45.3, 46.9)),
    "seg-b-mask-ade20k": _segmenter("Seg-B-Mask/16", "mask_transformer", "ViT-B/16", "ade20k", "ade20k/seg_base_mask", (48.5, 50.0)),
    "seg-b8-ade20k": _segmenter("Seg-B/8", "linear", "ViT-B/8", "ade20k", "ade20k/seg_base_patch8", (49.5, 50.5)),
    "seg-l-mask-ade20k": _segmenter("Seg-L-Mask/16", "mask_transformer", "ViT-L/16", "ade20k", "ade20k/seg_large_mask_640", (51.8, 53.6)),
    "seg-b-deit-ade20k": _segmenter("Seg-B†/16", "linear", "DeiT-B/16", "ade20k", "ade20k/seg_base_deit_linear", (47.1, 48.1)),
    "seg-b-deit-mask-ade20k": _segmenter(
        "Seg-B†-Mask/16", "mask_transformer", "DeiT-B/16", "ade20k", "ade20k/seg_base_deit_mask", (48.7, 50.1)
    ),
    "seg-l-mask-pascal-context": _segmenter(
        "Seg-L-Mask/16", "mask_transformer", "ViT-L/16", "pascal_context", "pascal_context/seg_large_mask", (58.1, 59.0)
    ),
    "seg-l-mask-cityscapes": _segmenter(
        "Seg-L-Mask/16", "mask_transformer", "ViT-L/16", "cityscapes", "cityscapes/seg_large_mask", (79.1, 81.3)
    ),
    "depict-sa": ZooEntry(
        "DEPICT-SA", "depict_sa", "per release", "ade20k",
        drive_folder="https://drive.google.com/drive/folders/1feq6ldmup86Qdav7GVX9rYWQqufiHtSJ?usp=drive_link",
    ),
    "depict-ca": ZooEntry(
        "DEPICT-CA", "depict_ca", "per release", "ade20k",
        drive_folder="https://drive.google.com/drive/folders/1Zaz43QPTcHnYVlPGlZUXfTruag93wBG7?usp=drive_link",
    ),
}


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the entry's cache folder, "/"-separated: "checkpoint.pth", "DEPICT-SA-Small/variant.yml"
    url: str
    sha256: str | None = None  # known in advance (from the registry), checked at download


# ---------------------------------------------------------------------------------------------- names


def parse_name(name: str) -> tuple[str, ZooEntry, str]:
    """``NAME`` or ``NAME/RELEASE`` -> (entry name, entry, release folder inside it or "")."""
    entry_name, _, release = name.partition("/")
    if entry_name not in REGISTRY:
        raise ZooError(f"no zoo model {entry_name!r}; the zoo has: {', '.join(REGISTRY)}")
    entry = REGISTRY[entry_name]
    if release and entry.drive_folder is None:
        raise ZooError(f"zoo model {entry_name!r} is a single release; drop {'/' + release!r}")
    return entry_name, entry, release.strip("/")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The depict-analysis cache: ``cache_dir``, else ``$DEPICT_ANALYSIS_CACHE``, else ``~/.cache/depict-analysis``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "depict-analysis"


def entry_dir(entry_name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "zoo" / entry_name


# ------------------------------------------------------------------------------------------ manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """``{"files": {path: {"url", "size", "sha256"}}, "releases": {release: [paths]}}``; empty when none."""
    path = folder / MANIFEST
    if not path.is_file():
        return {"files": {}, "releases": {}}
    try:
        manifest = json.loads(path.read_text())
        return {"files": dict(manifest["files"]), "releases": dict(manifest["releases"])}
    except (ValueError, KeyError, TypeError):
        raise ZooError(f"{path}: unreadable; delete it and fetch again") from None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path, path: str, record: dict[str, Any], name: str) -> None:
    """Refuse a cached file whose size or sha256 differs from what its first download recorded."""
    file = folder / path
    fix = f"run `depict zoo fetch {name} --force` to download it again"
    if not file.is_file():
        raise ZooError(f"{file}: missing from the zoo cache; {fix}")
    if file.stat().st_size != record["size"] or sha256_of(file) != record["sha256"]:
        raise ZooError(f"{file}: differs from the file downloaded (size or sha256 changed: corrupted?); {fix}")


def release_records(name: str, cache_dir: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """``{path: {"url", "size", "sha256"}}`` of a cached release's files, as recorded at download."""
    entry_name, _, release = parse_name(name)
    manifest = read_manifest(entry_dir(entry_name, cache_dir))
    return {path: manifest["files"][path] for path in manifest["releases"].get(release or ".", [])}


def cached_releases(entry_name: str, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The releases of an entry whose files are all in the cache at their recorded size (no hashing)."""
    folder = entry_dir(entry_name, cache_dir)
    manifest = read_manifest(folder)
    return [
        release for release, paths in manifest["releases"].items()
        if all((folder / p).is_file() and (folder / p).stat().st_size == manifest["files"][p]["size"] for p in paths)
    ]


# ------------------------------------------------------------------------------------------- sources


def _gdown():
    try:
        import gdown
    except ImportError:
        raise ZooError("the DEPICT releases are Google Drive folders, fetched with gdown: pip install 'depict-analysis[zoo]'") from None
    return gdown


def _drive_files(entry_name: str, entry: ZooEntry, release: str) -> list[RemoteFile]:
    """The files of one release folder inside the entry's Drive folder (lists the folder online)."""
    gdown = _gdown()
    try:
        listing = gdown.download_folder(url=entry.drive_folder, skip_download=True, quiet=True)
    except (OSError, gdown.exceptions.DownloadError) as e:
        raise ZooUnreachable(f"could not list {entry.drive_folder} ({_one_line(e)})") from None
    files = [(PurePosixPath(Path(f.path).as_posix()), f.id) for f in listing]
    releases = sorted(str(p.parent) for p, _ in files if p.name == RELEASE_FILES[0])  # "." for the folder itself
    if not releases:
        raise ZooError(f"{entry.drive_folder}: no release folder (one with {RELEASE_FILES[0]}) found")
    if (release or ".") not in releases:
        named = ", ".join(f"zoo:{entry_name}/{r}" if r != "." else f"zoo:{entry_name}" for r in releases)
        what = f"has no release {release!r}" if release else "holds several releases; name one"
        raise ZooError(f"{entry_name} {what}: {named}")
    return [
        RemoteFile(str(p), f"https://drive.google.com/uc?id={file_id}")
        for p, file_id in files if str(p.parent) == (release or ".")
    ]


def remote_files(entry_name: str, entry: ZooEntry, release: str) -> list[RemoteFile]:
    if entry.drive_folder is not None:
        return _drive_files(entry_name, entry, release)
    return [RemoteFile(path, url, entry.sha256.get(path)) for path, url in entry.files.items()]


# ------------------------------------------------------------------------------------------ download


class _Interrupted(Exception):
    """The connection ended before the whole file came; the ``.part`` file keeps what did."""


def part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def http_download(url: str, target: Path, report: Callable[[int, int | None], None], timeout: float = TIMEOUT_S) -> None:
    """Stream ``url`` to ``<target>.part``, continuing an existing one with a ``Range`` request, then
    rename it to ``target``. Raises ``_Interrupted`` (the .part kept) when the connection is cut."""
    part = part_path(target)
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part is not a prefix the server can continue: start over
            part.unlink()
            return http_download(url, target, report, timeout)
        raise ZooError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ZooUnreachable(f"could not reach {url} ({_one_line(e.reason)})") from None
    except (TimeoutError, ConnectionError) as e:  # connected, then no answer
        raise _Interrupted(_one_line(e)) from None
    with response:
        resumed_at = response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        if offset and response.status == 206 and not resumed_at:
            part.unlink()
            raise _Interrupted(f"the server resumed at another offset than {offset}; starting over")
        if offset and response.status != 206:  # a server that ignores Range sends the whole file again
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        done = offset
        report(done, total)
        with open(part, "ab" if offset else "wb") as f:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    report(done, total)
            except (http.client.IncompleteRead, TimeoutError, ConnectionError) as e:
                raise _Interrupted(f"cut at {done} of {total} bytes ({type(e).__name__})") from None
    if total is not None and done != total:
        raise _Interrupted(f"cut at {done} of {total} bytes")
    os.replace(part, target)


def drive_download(url: str, target: Path, report: Callable[[int, int | None], None]) -> None:
    """One Drive file to ``target`` with gdown, which resumes its own ``.part`` file and renames at the end."""
    gdown = _gdown()
    try:
        gdown.download(url=url, output=str(target), quiet=True, resume=True, progress=report)
    except gdown.exceptions.FileURLRetrievalError as e:  # not shared, or over Drive's download quota
        raise ZooUnreachable(f"could not download {url} ({_one_line(e)})") from None
    except (OSError, gdown.exceptions.DownloadError) as e:  # a cut transfer: gdown continues its .part next time
        raise _Interrupted(_one_line(e)) from None


def download(remote: RemoteFile, target: Path, drive: bool, report: Callable[[int, int | None], None], retries: int) -> None:
    """Download one file, resuming up to ``retries`` times after a cut connection."""
    for attempt in range(retries + 1):
        try:
            return (drive_download if drive else http_download)(remote.url, target, report)
        except _Interrupted as e:
            if attempt == retries:
                raise ZooError(f"{remote.url}: download interrupted ({e}); run the same command again to resume") from None


def _one_line(e: object) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -------------------------------------------------------------------------------------------- progress


@contextmanager
def progress_bar(console: Console | None = None) -> Iterator[ProgressCallback]:
    """A rich progress bar (one row per file, on stderr by default) as a ProgressCallback."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True)) as bar:
        tasks: dict[str, Any] = {}

        def update(file: str, done: int, total: int | None) -> None:
            if file not in tasks:
                tasks[file] = bar.add_task(file, total=total)
            bar.update(tasks[file], completed=done, total=total)

        yield update


def _reporter(progress: bool | ProgressCallback):
    """A context giving the ProgressCallback for ``progress``: a bar when True and stderr is a terminal."""
    if callable(progress):
        return nullcontext(progress)
    if progress and sys.stderr.isatty():
        return progress_bar()
    return nullcontext(lambda file, done, total: None)


# ---------------------------------------------------------------------------------------------- fetch


def zoo_path(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | ProgressCallback = True,
    force: bool = False,
    retries: int = 2,
) -> Path:
    """The release folder of zoo model ``name`` (``checkpoint.pth`` + ``variant.yml``), downloaded on
    first use into the cache and verified against its manifest on every use.

    ``progress``: True for a bar on stderr when it is a terminal, False for none, or a callback
    ``(file, bytes so far, total or None)``. ``force``: download the release again. ``retries``:
    resumptions after a cut connection before giving up (the ``.part`` stays for the next call).
    """
    entry_name, entry, release = parse_name(name)
    folder = entry_dir(entry_name, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".lock"):  # one process fetches an entry at a time; the others then find it cached
        manifest = read_manifest(folder)
        key = release or "."
        if key in manifest["releases"] and not force:
            for path in manifest["releases"][key]:
                verify(folder, path, manifest["files"][path], name)
        elif not force and all((folder / release / f).is_file() for f in RELEASE_FILES):  # copied here by hand
            _register(name, entry, release, folder / release, folder, manifest, force=False)
        else:
            try:
                _fetch(name, entry_name, entry, release, folder, manifest, progress, force, retries)
            except ZooUnreachable as e:
                raise ZooUnreachable(f"{e}; {offline_routes(name)}") from None
    release_folder = folder / release
    for required in RELEASE_FILES:
        if not (release_folder / required).is_file():
            raise ZooError(f"zoo model {name}: the release has no {required}")
    return release_folder


def _fetch(
    name: str, entry_name: str, entry: ZooEntry, release: str, folder: Path, manifest: dict[str, Any],
    progress: bool | ProgressCallback, force: bool, retries: int,
) -> None:
    """Download the files of a release that are not already complete in the cache; record them in the manifest."""
    files = remote_files(entry_name, entry, release)
    with _reporter(progress) as report:
        for remote in files:
            target = folder / remote.path
            record = manifest["files"].get(remote.path)
            if record and not force and target.is_file():
                verify(folder, remote.path, record, name)  # completed by an earlier, interrupted fetch
                continue
            target.unlink(missing_ok=True)  # a file the manifest does not vouch for is downloaded again
            if force:
                _discard_partial(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            download(remote, target, entry.drive_folder is not None, lambda done, total: report(remote.path, done, total), retries)
            record = {"url": remote.url, "size": target.stat().st_size, "sha256": sha256_of(target)}
            if remote.sha256 and record["sha256"] != remote.sha256:
                target.unlink()
                raise ZooError(f"{remote.url}: sha256 {record['sha256']} differs from the published {remote.sha256}")
            manifest["files"][remote.path] = record
            write_manifest(folder, manifest)
    manifest["releases"][release or "."] = [remote.path for remote in files]
    write_manifest(folder, manifest)


def _discard_partial(target: Path) -> None:
    """Remove any partial download of a file (ours: ``<file>.part``; gdown's: ``<file>*.part``)."""
    for part in target.parent.glob(f"{target.name}*.part"):
        part.unlink()


# --------------------------------------------------------------------------------------------- import


def import_release(
    name: str, source: str | os.PathLike, cache_dir: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Copy a release downloaded elsewhere into the cache as zoo model ``name``; returns its cache folder.

    ``source``: the release folder (``checkpoint.pth`` + ``variant.yml``, with ``log.txt`` where the
    entry lists one) or its ``checkpoint.pth``. For a Drive entry named without its release
    (``depict-sa``), the release is the source folder's name (``DEPICT-SA-Small``). Each file is checked
    against the sha256 the registry publishes, where it has one, and against the size and sha256 the
    manifest recorded before (a changed file is refused unless ``force``); the copies are written
    beside their targets and renamed when complete.
    """
    source = Path(source)
    if source.is_file() and source.name == RELEASE_FILES[0]:
        source = source.parent
    if not source.is_dir():
        raise ZooError(f"{source}: no such release folder (one with {' and '.join(RELEASE_FILES)})")
    missing = [f for f in RELEASE_FILES if not (source / f).is_file()]
    if missing:
        raise ZooError(f"{source}: not a release folder, it has no {' and no '.join(missing)}")
    entry_name, entry, release = parse_name(name)
    if entry.drive_folder is not None and not release:
        release = source.name
        name = f"{entry_name}/{release}"
    folder = entry_dir(entry_name, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".lock"):
        _register(name, entry, release, source, folder, read_manifest(folder), force)
    return folder / release


def _register(
    name: str, entry: ZooEntry, release: str, source: Path, folder: Path, manifest: dict[str, Any], force: bool
) -> None:
    """Record the release files found in ``source`` (copying them into ``folder / release`` when ``source``
    is elsewhere) in the manifest, after checking each against its published and recorded sha256."""
    files = [f for f in dict.fromkeys([*RELEASE_FILES, *entry.files]) if (source / f).is_file()]
    paths = [str(PurePosixPath(release) / f) if release else f for f in files]
    for path, file in zip(paths, files):
        record = {"url": entry.files.get(file, ""), "size": (source / file).stat().st_size, "sha256": sha256_of(source / file)}
        published = entry.sha256.get(path)
        if published and record["sha256"] != published:
            raise ZooError(f"{source / file}: sha256 {record['sha256']} differs from the published {published}")
        before = manifest["files"].get(path)
        if before and not force and (before["size"], before["sha256"]) != (record["size"], record["sha256"]):
            raise ZooError(f"{source / file}: differs from the {path} recorded for zoo:{name} (size or sha256); "
                           "import with force=True to replace it", arguments="force=True")
        target = folder / path
        if target.resolve() != (source / file).resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            part = part_path(target)
            shutil.copyfile(source / file, part)
            os.replace(part, target)
        manifest["files"][path] = record
    manifest["releases"][release or "."] = paths
    write_manifest(folder, manifest)
