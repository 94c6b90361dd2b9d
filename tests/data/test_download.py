"""Downloads against a local HTTP server on 127.0.0.1: layout, checksum, resume, failures."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gaqat import cli
from gaqat.data import SPECS, download_dataset, load_dataset
from gaqat.data import download as download_module
from gaqat.data.download import Archive


class Server:
    """Serves ``files`` (name -> bytes) with Range support; can cut the next response short,
    ignore Range headers, or answer with an HTML page, as real servers do."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, str]] = []
        self.cut_next_at: int | None = None
        self.ignore_range = False
        self.html = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                server.requests.append(dict(self.headers, path=self.path))
                body = server.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                ranged = self.headers.get("Range") and not server.ignore_range
                if ranged:
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_error(416)
                        return
                self.send_response(206 if ranged else 200)
                self.send_header(
                    "Content-Type", "text/html" if server.html else "application/octet-stream"
                )
                self.send_header("Content-Length", str(len(body) - start))
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                payload = body[start:]
                if server.cut_next_at is not None:
                    payload, server.cut_next_at = payload[: server.cut_next_at], None
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def zip_tree(folder: Path, top: str) -> bytes:
    """A zip of ``folder``'s files under the top-level directory ``top``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, f"{top}/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


def tar_tree(folder: Path, top: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        t.add(folder, arcname=top)
    return buffer.getvalue()


@pytest.fixture
def pacs_zip(tmp_path, make_tree) -> bytes:
    """PACS as its archive ships it: a top folder ``kfold/`` holding the domains."""
    spec = SPECS["pacs"]
    tree = make_tree(tmp_path / "src", {d: list(spec.classes) for d in spec.domains}, per_class=1)
    return zip_tree(tree, "kfold")


def test_download_lays_out_pacs_and_warns_without_checksum(server, pacs_zip, tmp_path):
    server.files["PACS.zip"] = pacs_zip
    root = tmp_path / "data"
    archives = (Archive(server.url("PACS.zip"), "PACS.zip"),)
    with pytest.warns(UserWarning, match="no published SHA-256 for PACS.zip"):
        target = download_dataset("pacs", root, archives=archives, progress=False)
    assert target == root / "PACS"
    ds = load_dataset("PACS", root)
    assert ds.domains == list(SPECS["pacs"].domains) and [len(d) for d in ds.datasets] == [7] * 4
    assert not (root / "_downloads").exists() and not (root / ".PACS.staging").exists()
    # Already laid out: nothing is fetched again.
    before = len(server.requests)
    assert download_dataset("PACS", root, archives=archives) == target
    assert len(server.requests) == before


def test_matching_checksum_passes_and_a_wrong_one_fails(server, pacs_zip, tmp_path):
    server.files["PACS.zip"] = pacs_zip
    good = hashlib.sha256(pacs_zip).hexdigest()
    download_dataset(
        "PACS",
        tmp_path / "a",
        progress=False,
        archives=(Archive(server.url("PACS.zip"), "PACS.zip", good),),
    )
    assert (tmp_path / "a" / "PACS" / "sketch").is_dir()
    with pytest.raises(RuntimeError) as error:
        download_dataset(
            "PACS",
            tmp_path / "b",
            progress=False,
            archives=(Archive(server.url("PACS.zip"), "PACS.zip", "0" * 64),),
        )
    message = str(error.value)
    assert "does not match" in message and "ROOT/PACS/<domain>/<class>/<image>" in message
    assert not (tmp_path / "b" / "_downloads" / "PACS.zip").exists()


def test_interrupted_download_resumes_with_a_range_request(server, pacs_zip, tmp_path):
    server.files["PACS.zip"] = pacs_zip
    archives = (Archive(server.url("PACS.zip"), "PACS.zip", hashlib.sha256(pacs_zip).hexdigest()),)
    half = len(pacs_zip) // 2
    server.cut_next_at = half
    with pytest.raises(RuntimeError) as error:
        download_dataset("PACS", tmp_path, archives=archives, progress=False)
    message = str(error.value)
    assert "resumes" in message and "by hand" in message and "art_painting" in message
    part = tmp_path / "_downloads" / "PACS.zip.part"
    assert part.stat().st_size == half
    download_dataset("PACS", tmp_path, archives=archives, progress=False)
    assert server.requests[-1]["Range"] == f"bytes={half}-"
    assert len(load_dataset("PACS", tmp_path)) == 4 and not part.exists()


def test_server_ignoring_range_restarts_cleanly(server, pacs_zip, tmp_path):
    server.files["PACS.zip"] = pacs_zip
    archives = (Archive(server.url("PACS.zip"), "PACS.zip", hashlib.sha256(pacs_zip).hexdigest()),)
    downloads = tmp_path / "_downloads"
    downloads.mkdir()
    (downloads / "PACS.zip.part").write_bytes(b"stale bytes from another file")
    server.ignore_range = True
    download_dataset("PACS", tmp_path, archives=archives, progress=False)
    assert "Range" in server.requests[-1] and (tmp_path / "PACS" / "photo").is_dir()


def dead_url(name: str) -> str:
    """A URL on a local port that nothing listens on: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/{name}"


def test_network_failure_explains_the_manual_layout(tmp_path):
    with pytest.raises(RuntimeError) as error:
        download_dataset(
            "VLCS",
            tmp_path,
            progress=False,
            archives=(Archive(dead_url("VLCS.tar.gz"), "VLCS.tar.gz"),),
        )
    message = str(error.value)
    assert "could not download" in message and "by hand" in message
    assert "ROOT/VLCS/<domain>/<class>/<image>" in message and "Caltech101" in message


def test_a_web_page_instead_of_the_archive_is_an_error(server, tmp_path):
    server.files["PACS.zip"] = b"<html>quota exceeded</html>"
    server.html = True
    with pytest.raises(RuntimeError, match="returned a web page"):
        download_dataset(
            "PACS",
            tmp_path,
            progress=False,
            archives=(Archive(server.url("PACS.zip"), "PACS.zip"),),
        )


def test_vlcs_tar_gz_is_extracted(server, tmp_path, make_tree):
    spec = SPECS["vlcs"]
    tree = make_tree(tmp_path / "src", {d: list(spec.classes) for d in spec.domains}, per_class=1)
    server.files["VLCS.tar.gz"] = tar_tree(tree, "VLCS")
    with pytest.warns(UserWarning, match="integrity check skipped"):
        download_dataset(
            "VLCS",
            tmp_path / "data",
            progress=False,
            archives=(Archive(server.url("VLCS.tar.gz"), "VLCS.tar.gz"),),
        )
    assert load_dataset("vlcs", tmp_path / "data").domains == list(spec.domains)


def terra_archives(server, tmp_path, make_tree, labels_name="caltech_images_20210113.json"):
    """DomainBed's two TerraIncognita files in miniature: the image archive (one flat
    folder) and the zipped labels JSON, with a decoy JSON beside it."""
    images = tmp_path / "images"
    make_tree(images, {"flat": ["all"]}, per_class=6)
    files = sorted((images / "flat" / "all").iterdir())
    locations = ["100", "38", "43", "46", "7", 38]  # 7 is not one of the four domains
    annotations = {
        "categories": [
            {"id": 1, "name": "bobcat"},
            {"id": 2, "name": "car"},
            {"id": 3, "name": "empty"},
            {"id": 4, "name": "coyote"},
        ],
        "images": [
            {"id": f"im{i}", "file_name": f.name, "location": loc}
            for i, (f, loc) in enumerate(zip(files, locations))
        ],
        "annotations": [{"image_id": f"im{i}", "category_id": 1 if i % 2 else 3} for i in range(6)]
        + [
            {"image_id": "im0", "category_id": 2},  # not a TerraIncognita class
            {"image_id": "im1", "category_id": 4},
        ],  # a second class: a second copy
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(labels_name, json.dumps(annotations))
        z.writestr("a_decoy.json", json.dumps({"categories": [], "images": [], "annotations": []}))
    server.files["images.tar.gz"] = tar_tree(images / "flat" / "all", "eccv_18_all_images_sm")
    server.files["labels.zip"] = buffer.getvalue()
    return (
        Archive(server.url("images.tar.gz"), "images.tar.gz"),
        Archive(server.url("labels.zip"), "labels.zip"),
    )


def test_terra_incognita_is_sorted_as_domainbed_sorts_it(server, tmp_path, make_tree):
    lila = "https://lilablobssc.blob.core.windows.net/caltechcameratraps"
    assert [a.url for a in download_module.SOURCES["terraincognita"]] == [  # DomainBed's
        f"{lila}/eccv_18_all_images_sm.tar.gz",
        f"{lila}/labels/caltech_camera_traps.json.zip",
    ]
    with pytest.warns(UserWarning):
        target = download_dataset(
            "TerraIncognita",
            tmp_path / "data",
            progress=False,
            archives=terra_archives(server, tmp_path, make_tree),
        )
    laid_out = sorted(p.relative_to(target).as_posix() for p in target.rglob("*.png"))
    assert laid_out == [
        "location_100/empty/0.png",
        "location_38/bobcat/1.png",
        "location_38/bobcat/5.png",
        "location_38/coyote/1.png",
        "location_43/empty/2.png",
        "location_46/bobcat/3.png",
    ]
    with pytest.warns(UserWarning, match="has no images of class"):
        ds = load_dataset("TerraIncognita", tmp_path / "data")
    assert ds.domains == ["location_100", "location_38", "location_43", "location_46"]


def test_terra_incognita_needs_domainbeds_labels_file(server, tmp_path, make_tree):
    archives = terra_archives(
        server, tmp_path, make_tree, labels_name="caltech_bboxes_20200316.json"
    )
    with (
        pytest.raises(
            RuntimeError,
            match=r"caltech_images_20210113.json not found in the "
            r"TerraIncognita archives \(found: a_decoy.json, "
            r"caltech_bboxes_20200316.json\)",
        ),
        pytest.warns(UserWarning),
    ):
        download_dataset("TerraIncognita", tmp_path / "data", archives=archives, progress=False)


def test_cli_download_failure_prints_the_layout(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(
        download_module.SOURCES, "pacs", (Archive(dead_url("PACS.zip"), "PACS.zip"),)
    )
    assert cli.main(["data", "download", "PACS", "--root", str(tmp_path)]) == 1  # at run time
    err = capsys.readouterr().err
    assert "could not download" in err and "ROOT/PACS/<domain>/<class>/<image>" in err
    with pytest.raises(ValueError, match="downloadable: PACS, VLCS"):
        download_dataset("digits", tmp_path)


def test_a_complete_part_file_is_finished_without_refetching(server, pacs_zip, tmp_path):
    """A run killed between the last byte and the rename: the server answers 416."""
    server.files["PACS.zip"] = pacs_zip
    downloads = tmp_path / "_downloads"
    downloads.mkdir()
    (downloads / "PACS.zip.part").write_bytes(pacs_zip)
    archives = (Archive(server.url("PACS.zip"), "PACS.zip", hashlib.sha256(pacs_zip).hexdigest()),)
    download_dataset("PACS", tmp_path, archives=archives, progress=False)
    assert server.requests[-1]["Range"] == f"bytes={len(pacs_zip)}-"
    assert (tmp_path / "PACS" / "cartoon").is_dir()
