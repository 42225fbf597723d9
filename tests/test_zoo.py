"""The model zoo against fake releases served from 127.0.0.1: download, progress, resume after a cut
connection, integrity checks, cache reuse, and zoo:NAME in the CLI. Nothing leaves the loopback."""

import hashlib
import io
import json
import socket
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from depict_analysis.cli.main import app
from depict_analysis.models import load_model
from depict_analysis.models import zoo
from depict_analysis.models.zoo import ZooEntry, ZooError, zoo_path
from tests import official_layout as ref


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any connection or name lookup beyond 127.0.0.1 fails the test."""
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "127.0.0.1":
            raise AssertionError(f"network access to {address}")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host != "127.0.0.1":
            raise AssertionError(f"name lookup of {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


class ReleaseServer:
    """Serves ``files`` (path -> bytes) over HTTP with Range support; records every request; can cut
    the connection of the next request of a path after N body bytes, or ignore Range headers."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before the connection drops (once)
        self.ignore_range = False
        self.misplaced_range = False  # answer a Range request with 206 from byte 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.lstrip("/")
                server.requests.append((path, self.headers.get("Range")))
                if path not in server.files:
                    self.send_error(404)
                    return
                body, start = server.files[path], 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = 0 if server.misplaced_range else int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cut_after.pop(path, None)
                self.wfile.write(body[start:] if cut is None else body[start : start + cut])
                self.close_connection = cut is not None

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture
def release(tmp_path):
    """A tiny official-layout DEPICT-SA release (checkpoint.pth, variant.yml, log.txt) as bytes."""
    ref.write_release(tmp_path / "source", "depict_sa", seed=5)
    (tmp_path / "source" / "log.txt").write_text('{"epoch": 3, "val_miou": 1.0}\n')
    return {p.name: p.read_bytes() for p in (tmp_path / "source").iterdir()}


@pytest.fixture
def server(release):
    served = ReleaseServer({f"rel/{name}": data for name, data in release.items()})
    served.thread.start()
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


@pytest.fixture
def entry(server, monkeypatch, tmp_path):
    """``test-entry`` in the registry, pointing at the local server; the cache in tmp_path."""
    files = {name: f"{server.url}/rel/{name}" for name in ("checkpoint.pth", "variant.yml", "log.txt")}
    monkeypatch.setitem(zoo.REGISTRY, "test-entry", ZooEntry("Test", "depict_sa", "tiny", "ade20k", (1.0, 2.0), files))
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "zoo" / "test-entry"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_places_files_records_manifest_and_reports_progress(entry, server, release):
    reports = []
    folder = zoo_path("test-entry", progress=lambda *r: reports.append(r))
    assert folder == entry
    for name, data in release.items():
        assert (folder / name).read_bytes() == data
    assert not list(folder.glob("*.part"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["releases"] == {".": ["checkpoint.pth", "variant.yml", "log.txt"]}
    for name, data in release.items():
        assert manifest["files"][name] == {"url": f"{server.url}/rel/{name}", "size": len(data), "sha256": sha256(data)}
    # progress: per file, from 0 up to the file's size, never backwards, the total known throughout
    for name, data in release.items():
        seen = [(done, total) for file, done, total in reports if file == name]
        assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
        assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    model, meta = load_model(folder)
    assert model.config.decoder.name == "depict_sa" and meta["source"] == "official"


def test_second_use_reads_the_cache_without_any_request(entry, server):
    zoo_path("test-entry", progress=False)
    server.requests.clear()
    server.httpd.shutdown()  # nothing to answer: the cache must do
    assert zoo_path("test-entry", progress=False) == entry
    assert server.requests == []


def test_cut_connection_leaves_a_part_file_and_the_next_fetch_resumes_with_range(entry, server, release):
    server.cut_after["rel/checkpoint.pth"] = 1000
    with pytest.raises(ZooError, match="interrupted.*again to resume") as error:
        zoo_path("test-entry", progress=False, retries=0)
    assert "\n" not in str(error.value)
    assert not (entry / "checkpoint.pth").exists()  # never a half file under the final name
    assert (entry / "checkpoint.pth.part").read_bytes() == release["checkpoint.pth"][:1000]

    server.requests.clear()
    reports = []
    zoo_path("test-entry", progress=lambda *r: reports.append(r), retries=0)
    assert ("rel/checkpoint.pth", "bytes=1000-") in server.requests
    assert (entry / "checkpoint.pth").read_bytes() == release["checkpoint.pth"]
    assert not (entry / "checkpoint.pth.part").exists()
    size = len(release["checkpoint.pth"])
    assert [r for r in reports if r[0] == "checkpoint.pth"][0] == ("checkpoint.pth", 1000, size)  # resumed, not restarted
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["files"]["checkpoint.pth"]["sha256"] == sha256(release["checkpoint.pth"])


def test_a_cut_within_one_call_is_resumed_by_its_retries(entry, server, release):
    server.cut_after["rel/checkpoint.pth"] = 777
    zoo_path("test-entry", progress=False, retries=1)
    assert server.paths().count("rel/checkpoint.pth") == 2
    assert ("rel/checkpoint.pth", "bytes=777-") in server.requests
    assert (entry / "checkpoint.pth").read_bytes() == release["checkpoint.pth"]


def test_a_server_ignoring_range_restarts_the_file(entry, server, release):
    entry.mkdir(parents=True)
    (entry / "checkpoint.pth.part").write_bytes(b"x" * 500)  # garbage that must not survive
    server.ignore_range = True
    zoo_path("test-entry", progress=False)
    assert ("rel/checkpoint.pth", "bytes=500-") in server.requests
    assert (entry / "checkpoint.pth").read_bytes() == release["checkpoint.pth"]


def test_a_206_from_another_offset_restarts_the_file(entry, server, release):
    entry.mkdir(parents=True)
    (entry / "checkpoint.pth.part").write_bytes(release["checkpoint.pth"][:300])
    server.misplaced_range = True
    zoo_path("test-entry", progress=False, retries=1)
    assert [r for p, r in server.requests if p == "rel/checkpoint.pth"] == ["bytes=300-", None]
    assert (entry / "checkpoint.pth").read_bytes() == release["checkpoint.pth"]


def test_a_part_file_longer_than_the_file_restarts_after_416(entry, server, release):
    entry.mkdir(parents=True)
    (entry / "variant.yml.part").write_bytes(b"y" * (len(release["variant.yml"]) + 10))
    zoo_path("test-entry", progress=False)
    assert server.paths().count("rel/variant.yml") == 2
    assert (entry / "variant.yml").read_bytes() == release["variant.yml"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_changed_cached_file_is_refused_until_fetched_again(entry, server, release, damage):
    zoo_path("test-entry", progress=False)
    ckpt = entry / "checkpoint.pth"
    data = bytearray(ckpt.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # same size: only the hash tells
        ckpt.write_bytes(bytes(data))
    elif damage == "truncate":
        ckpt.write_bytes(bytes(data[:-1]))
    else:
        ckpt.unlink()
    with pytest.raises(ZooError) as error:
        zoo_path("test-entry", progress=False)
    message = str(error.value)
    assert "\n" not in message and "checkpoint.pth" in message and "depict zoo fetch test-entry --force" in message
    server.requests.clear()
    zoo_path("test-entry", progress=False, force=True)
    assert sorted(server.paths()) == ["rel/checkpoint.pth", "rel/log.txt", "rel/variant.yml"]
    assert ckpt.read_bytes() == release["checkpoint.pth"]
    zoo_path("test-entry", progress=False)  # verified again


def test_a_published_hash_that_does_not_match_is_refused(entry, server, monkeypatch):
    good = zoo.REGISTRY["test-entry"]
    wrong = ZooEntry(good.title, good.family, good.backbone, good.dataset, good.miou, good.files, sha256={"variant.yml": "0" * 64})
    monkeypatch.setitem(zoo.REGISTRY, "test-entry", wrong)
    with pytest.raises(ZooError, match="variant.yml: sha256 .* differs from the published 0000"):
        zoo_path("test-entry", progress=False)
    assert not (entry / "variant.yml").exists()
    assert "variant.yml" not in json.loads((entry / "manifest.json").read_text())["files"]


def test_two_fetches_at_once_download_each_file_once(entry, server, release):
    results, errors = [], []

    def fetch():
        try:
            results.append(zoo_path("test-entry", progress=False))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [entry, entry]
    assert sorted(server.paths()) == ["rel/checkpoint.pth", "rel/log.txt", "rel/variant.yml"]


def test_http_errors_and_unknown_names_are_one_line(entry, server, monkeypatch):
    with pytest.raises(ZooError, match=r"no zoo model 'nope'; the zoo has: seg-t-mask-ade20k, .*depict-ca, test-entry"):
        zoo_path("nope")
    with pytest.raises(ZooError, match="single release"):
        zoo_path("test-entry/sub")
    broken = dict(zoo.REGISTRY["test-entry"].files, **{"log.txt": f"{server.url}/rel/missing.txt"})
    monkeypatch.setitem(zoo.REGISTRY, "test-entry", ZooEntry("Test", "depict_sa", "tiny", "ade20k", None, broken))
    with pytest.raises(ZooError, match=r"missing.txt: HTTP 404"):
        zoo_path("test-entry", progress=False)


def test_progress_bar_shows_each_file_and_its_size():
    out = io.StringIO()
    with zoo.progress_bar(Console(file=out, force_terminal=True, width=120)) as report:
        report("checkpoint.pth", 0, 2_000_000)
        report("checkpoint.pth", 2_000_000, 2_000_000)
    text = out.getvalue()
    assert "checkpoint.pth" in text and "2.0/2.0 MB" in text


def test_cli_uses_zoo_names_and_lists_and_fetches(entry, server, release):
    runner = CliRunner()
    fetched = runner.invoke(app, ["zoo", "fetch", "test-entry", "--no-progress"])
    assert fetched.exit_code == 0, fetched.output
    assert fetched.output.splitlines()[-1] == str(entry)
    assert sha256(release["checkpoint.pth"])[:16] in fetched.output and "manifest" not in fetched.output
    listed = runner.invoke(app, ["zoo", "list"], env={"COLUMNS": "200"})
    row = next(line for line in listed.output.splitlines() if line.startswith("test-entry"))
    assert row.split() == ["test-entry", "DEPICT-SA", "tiny", "ade20k", "1.0/2.0", "yes"]
    info = runner.invoke(app, ["info", "zoo:test-entry", "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    assert summary["decoder"] == "depict_sa" and summary["n_cls"] == ref.K
    unknown = runner.invoke(app, ["info", "zoo:nope"])
    assert unknown.exit_code == 2 and "no zoo model 'nope'" in unknown.output


# ------------------------------------------------------------------------------ Google Drive folders


@pytest.fixture
def drive(server, release, monkeypatch, tmp_path):
    """A Drive-folder entry ``test-drive`` with releases REL-A and REL-B, through a stand-in for gdown
    that lists the folder and serves each file id from the local server."""
    listing = [
        types.SimpleNamespace(id=f"{rel}-{name}", path=f"{rel}/{name}", local_path="")
        for rel in ("REL-A", "REL-B") for name in ("checkpoint.pth", "variant.yml")
    ] + [types.SimpleNamespace(id="readme", path="README.txt", local_path="")]
    calls = []

    def download_folder(url, skip_download, quiet):
        assert url == "https://drive.google.com/drive/folders/FOLDER" and skip_download
        return listing

    def download(url, output, quiet, resume, progress):
        calls.append(url)
        name = url.rsplit("-", 1)[-1]
        data = release[name]
        progress(len(data), len(data))
        Path(output).write_bytes(data)
        return output

    download_error = type("DownloadError", (Exception,), {})
    exceptions = types.SimpleNamespace(DownloadError=download_error, FileURLRetrievalError=type("E", (download_error,), {}))
    fake = types.SimpleNamespace(download_folder=download_folder, download=download, exceptions=exceptions)
    monkeypatch.setitem(sys.modules, "gdown", fake)
    entry = ZooEntry("Drive", "depict_sa", "tiny", "ade20k", drive_folder="https://drive.google.com/drive/folders/FOLDER")
    monkeypatch.setitem(zoo.REGISTRY, "test-drive", entry)
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    return calls


def test_drive_folder_names_its_releases_and_fetches_only_the_one_asked(drive, tmp_path):
    with pytest.raises(ZooError, match="test-drive holds several releases; name one: zoo:test-drive/REL-A, zoo:test-drive/REL-B"):
        zoo_path("test-drive", progress=False)
    with pytest.raises(ZooError, match="has no release 'REL-C'"):
        zoo_path("test-drive/REL-C", progress=False)
    folder = zoo_path("test-drive/REL-B", progress=False)
    assert folder == tmp_path / "cache" / "zoo" / "test-drive" / "REL-B"
    assert drive == ["https://drive.google.com/uc?id=REL-B-checkpoint.pth", "https://drive.google.com/uc?id=REL-B-variant.yml"]
    assert load_model(folder)[0].config.decoder.name == "depict_sa"
    assert zoo.cached_releases("test-drive") == ["REL-B"]
    drive.clear()
    zoo_path("test-drive/REL-B", progress=False)
    assert drive == []  # cached: no listing, no download


def test_drive_files_resume_through_the_real_gdown(server, release, tmp_path):
    """Our calls into gdown match its API: it streams a file, reports progress and resumes a cut transfer."""
    pytest.importorskip("gdown")
    server.cut_after["rel/checkpoint.pth"] = 700_000  # gdown writes whole chunks of 512 KiB
    reports = []
    target = tmp_path / "checkpoint.pth"
    zoo.download(zoo.RemoteFile("checkpoint.pth", f"{server.url}/rel/checkpoint.pth"), target, True,
                 lambda *r: reports.append(r), retries=1)
    assert target.read_bytes() == release["checkpoint.pth"]
    resumed_at = [int(r.removeprefix("bytes=").rstrip("-")) for _, r in server.requests if r]
    assert len(resumed_at) == 1 and 0 < resumed_at[0] <= 700_000
    assert reports[-1] == (len(release["checkpoint.pth"]), len(release["checkpoint.pth"]))
    assert not list(tmp_path.glob("*.part"))


def test_drive_entries_need_gdown(monkeypatch):
    monkeypatch.setitem(sys.modules, "gdown", None)  # as if not installed
    with pytest.raises(ZooError, match=r"pip install 'depict-analysis\[zoo\]'"):
        zoo_path("depict-sa/DEPICT-SA-Small")


def test_registry_holds_the_published_links():
    segmenter = {name: e for name, e in zoo.REGISTRY.items() if e.drive_folder is None}
    assert len(segmenter) == 9
    for entry in segmenter.values():
        assert sorted(entry.files) == ["checkpoint.pth", "log.txt", "variant.yml"]
        folders = {url.rsplit("/", 1)[0] for url in entry.files.values()}
        assert len(folders) == 1 and folders.pop().startswith("https://www.rocq.inria.fr/cluster-willow/rstrudel/segmenter/checkpoints/")
    assert zoo.REGISTRY["seg-l-mask-ade20k"].files["checkpoint.pth"].endswith("/ade20k/seg_large_mask_640/checkpoint.pth")
    assert zoo.REGISTRY["depict-sa"].drive_folder.startswith("https://drive.google.com/drive/folders/1feq6ldmup86Qdav7GVX9rYWQqufiHtSJ")
    assert zoo.REGISTRY["depict-ca"].drive_folder.startswith("https://drive.google.com/drive/folders/1Zaz43QPTcHnYVlPGlZUXfTruag93wBG7")


# ------------------------------------------------------------------------------ offline: import, copies


def test_offline_error_names_import_and_the_release_folder_route(monkeypatch, tmp_path):
    monkeypatch.setitem(zoo.REGISTRY, "test-offline", ZooEntry("T", "depict_sa", "tiny", "ade20k", None,
                                                               {"checkpoint.pth": "http://127.0.0.1:9/c", "variant.yml": "http://127.0.0.1:9/v"}))
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ZooError) as error:  # port 9 (discard) on the loopback: refused, as offline
        zoo_path("test-offline", progress=False)
    message = str(error.value)
    assert "could not reach http://127.0.0.1:9/c" in message and "\n" not in message
    assert "depict zoo import test-offline FOLDER" in message and "pass the release folder" in message


def test_import_copies_a_release_that_then_loads_without_any_request(entry, server, release, tmp_path):
    downloaded = tmp_path / "Downloads" / "seg"
    downloaded.mkdir(parents=True)
    for name, data in release.items():
        (downloaded / name).write_bytes(data)
    folder = zoo.import_release("test-entry", downloaded / "checkpoint.pth")
    assert folder == entry and {p.name for p in folder.iterdir()} >= set(release)
    records = zoo.release_records("test-entry")
    assert records["checkpoint.pth"]["sha256"] == sha256(release["checkpoint.pth"]) and set(records) == set(release)
    assert zoo_path("test-entry", progress=False) == entry and server.requests == []
    assert load_model(entry)[0].config.decoder.name == "depict_sa"
    assert not list(entry.glob("*.part"))


def test_import_checks_published_and_recorded_hashes(entry, server, release, tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    for name, data in release.items():
        (source / name).write_bytes(data)
    published = dict(zoo.REGISTRY["test-entry"].files)
    monkeypatch.setitem(zoo.REGISTRY, "test-entry", ZooEntry("Test", "depict_sa", "tiny", "ade20k", None, published,
                                                             sha256={"checkpoint.pth": "0" * 64}))
    with pytest.raises(ZooError, match="differs from the published 0000"):
        zoo.import_release("test-entry", source)
    monkeypatch.setitem(zoo.REGISTRY, "test-entry", ZooEntry("Test", "depict_sa", "tiny", "ade20k", None, published))
    zoo.import_release("test-entry", source)
    (source / "variant.yml").write_text((source / "variant.yml").read_text() + "\n# edited\n")
    with pytest.raises(ZooError, match="differs from the variant.yml recorded for zoo:test-entry"):
        zoo.import_release("test-entry", source)
    zoo.import_release("test-entry", source, force=True)
    assert (entry / "variant.yml").read_text().endswith("# edited\n")
    with pytest.raises(ZooError, match="not a release folder, it has no variant.yml"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "checkpoint.pth").write_bytes(release["checkpoint.pth"])
        zoo.import_release("test-entry", tmp_path / "half")
    assert server.requests == []


def test_files_copied_into_the_cache_by_hand_are_used_without_a_download(entry, server, release):
    entry.mkdir(parents=True)
    for name in ("checkpoint.pth", "variant.yml"):
        (entry / name).write_bytes(release[name])
    assert zoo_path("test-entry", progress=False) == entry
    assert server.requests == []
    assert set(zoo.release_records("test-entry")) == {"checkpoint.pth", "variant.yml"}
    (entry / "checkpoint.pth").write_bytes(release["checkpoint.pth"][:-1] + b"!")  # recorded now: a change is caught
    with pytest.raises(ZooError, match="differs from the file downloaded"):
        zoo_path("test-entry", progress=False)


def test_import_of_a_drive_release_takes_the_folder_name(drive, release, tmp_path):
    downloaded = tmp_path / "DEPICT-SA-Small"
    downloaded.mkdir()
    for name in ("checkpoint.pth", "variant.yml"):
        (downloaded / name).write_bytes(release[name])
    runner = CliRunner()
    result = runner.invoke(app, ["zoo", "import", "test-drive", str(downloaded)])
    assert result.exit_code == 0, result.output
    assert "use it as zoo:test-drive/DEPICT-SA-Small" in result.output
    assert result.output.splitlines()[-1] == str(tmp_path / "cache" / "zoo" / "test-drive" / "DEPICT-SA-Small")
    assert zoo_path("test-drive/DEPICT-SA-Small", progress=False).name == "DEPICT-SA-Small" and drive == []
    missing = runner.invoke(app, ["zoo", "import", "test-drive", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such release folder" in missing.output
