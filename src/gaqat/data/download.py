"""Download the five DomainBed datasets and lay them out as ``ROOT/<folder>/<domain>/<class>/``.

Broken downloads are DomainBed users' most common complaint, so: downloads resume from a
``.part`` file (HTTP Range), archives are checked against a SHA-256 where one is known,
and every failure ends with the manual layout.

Sources are DomainBed's (``domainbed/scripts/download.py``): Google Drive archives for
PACS, VLCS and OfficeHome, the VisDA-2019 server for DomainNet, LILA for TerraIncognita
(the ``eccv_18_all_images_sm`` images and the ``caltech_images_20210113.json`` labels,
sorted as DomainBed sorts them: locations 38, 43, 46 and 100, its ten categories).
DomainBed publishes no checksums and none could be verified offline, so ``sha256`` is
None for every archive: the check is skipped with a warning that prints the downloaded
file's SHA-256 for the user to compare. DomainBed also deletes a list of DomainNet
duplicate images; that list is not shipped here, so DomainNet keeps them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import tarfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError

from gaqat.data.specs import SPECS, FolderSpec
from gaqat.errors import UsageError
from gaqat.progress import progress as progress_display

CHUNK = 1 << 20
TIMEOUT_S = 60


@dataclass(frozen=True)
class Archive:
    """One file to fetch; ``sha256`` None means no checksum is known (check skipped)."""

    url: str
    filename: str
    sha256: str | None = None


def _google_drive(file_id: str) -> str:
    # The direct endpoint skips Drive's "cannot scan this file for viruses" page.
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


_VISDA = "http://csr.bu.edu/ftp/visda/2019/multi-source"
_LILA = "https://lilablobssc.blob.core.windows.net/caltechcameratraps"
TERRA_IMAGES = "eccv_18_all_images_sm"  # the archive's image folder
TERRA_LABELS = "caltech_images_20210113.json"  # inside caltech_camera_traps.json.zip

SOURCES: dict[str, tuple[Archive, ...]] = {
    "pacs": (Archive(_google_drive("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"), "PACS.zip"),),
    "vlcs": (Archive(_google_drive("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"), "VLCS.tar.gz"),),
    "officehome": (Archive(_google_drive("1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"), "office_home.zip"),),
    "domainnet": tuple(
        Archive(f"{_VISDA}/{path}.zip", f"{path.split('/')[-1]}.zip")
        for path in (
            "groundtruth/clipart",
            "infograph",
            "groundtruth/painting",
            "quickdraw",
            "real",
            "sketch",
        )
    ),
    "terraincognita": (
        Archive(f"{_LILA}/{TERRA_IMAGES}.tar.gz", "terra_incognita_images.tar.gz"),
        Archive(f"{_LILA}/labels/caltech_camera_traps.json.zip", "caltech_camera_traps.json.zip"),
    ),
}


class DownloadError(RuntimeError):
    """A network or server failure; the partial file is kept for resuming."""


def download_dataset(
    name: str,
    root: str | Path,
    *,
    archives: tuple[Archive, ...] | None = None,
    progress: bool = True,
    keep_archives: bool = False,
) -> Path:
    """Fetch, verify and extract a named dataset into ``root/<folder>``; returns that folder.

    ``archives`` replaces the built-in sources (a mirror, or a test server). Archives
    are kept under ``root/_downloads`` until the layout is complete, so an interrupted
    run resumes where it stopped.
    """
    spec = SPECS.get(name.lower())
    if spec is None:
        raise UsageError(
            f"unknown dataset {name!r}; downloadable: {', '.join(s.name for s in SPECS.values())}"
        )
    root = Path(root)
    target = root / spec.folder
    if all((target / d).is_dir() for d in spec.domains):
        return target  # already laid out: nothing to fetch
    archives = archives or SOURCES[spec.name.lower()]
    downloads = root / "_downloads"
    staging = root / f".{spec.folder}.staging"
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        files = [fetch(a.url, downloads / a.filename, a.sha256, progress) for a in archives]
        shutil.rmtree(staging, ignore_errors=True)
        for path in files:
            extract(path, staging)
        if spec.name == "TerraIncognita":
            _arrange_terra_incognita(staging, target, spec)
        else:
            _move_domains(staging, target, spec)
    except RuntimeError as error:
        raise RuntimeError(f"{error}\n{manual_instructions(spec, archives, root)}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_archives:
        for path in files:
            path.unlink()
        if not any(downloads.iterdir()):
            downloads.rmdir()
    return target


def manual_instructions(spec: FolderSpec, archives: tuple[Archive, ...], root: Path) -> str:
    """How to install a dataset by hand when the download cannot be completed."""
    urls = "\n".join(f"  {a.url}  (save as {a.filename})" for a in archives)
    return (
        f"To install {spec.name} by hand, download\n{urls}\ninto {root / '_downloads'} and "
        f"rerun this command (it resumes and extracts), or extract them yourself so that the "
        f"images are laid out as {spec.layout()}, with ROOT = {root}."
    )


def fetch(url: str, dest: Path, sha256: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a previous partial file."""
    dest = Path(dest)
    if dest.exists():
        _verify(dest, sha256)
        return dest
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "gaqat-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    total = None
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S
        ) as response:
            if offset and response.status != 206:
                offset = 0  # the server ignored the range: start over
            if "text/html" in response.headers.get("Content-Type", ""):
                raise DownloadError(
                    f"{url} returned a web page instead of {dest.name} "
                    f"(quota exceeded, login wall, or a moved file)"
                )
            total = _total_size(response, offset)
            with (
                open(part, "ab" if offset else "wb") as out,
                progress_display(total, dest.name, progress, initial=offset, unit="B") as bar,
            ):
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except HTTPError as error:
        if not (error.code == 416 and offset):  # 416 on a resume: the part is already whole
            raise DownloadError(
                f"could not download {url}: HTTP {error.code} {error.reason}"
            ) from error
    except (URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or repr(error)
        raise DownloadError(f"could not download {url}: {reason}; {_kept(part)}") from error
    if total is not None and part.stat().st_size != total:
        raise DownloadError(
            f"could not download {url}: the connection ended after "
            f"{part.stat().st_size} of {total} bytes; {_kept(part)}"
        )
    _verify(part, sha256)
    os.replace(part, dest)
    return dest


def _kept(part: Path) -> str:
    size = part.stat().st_size if part.exists() else 0
    return f"{size} bytes are kept in {part} and rerunning resumes from there"


def _total_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    """Full file size from Content-Range (206) or Content-Length (200), if the server says."""
    match = re.search(r"/(\d+)$", response.headers.get("Content-Range", ""))
    if match:
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def _verify(path: Path, sha256: str | None) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    actual = digest.hexdigest()
    if sha256 is None:
        warnings.warn(
            f"no published SHA-256 for {path.name}: integrity check skipped "
            f"(its SHA-256 is {actual})",
            stacklevel=3,
        )
    elif actual != sha256.lower():
        path.unlink()
        raise RuntimeError(
            f"{path.name}: SHA-256 {actual} does not match the expected "
            f"{sha256}; the file was deleted, rerun to download it again"
        )


def extract(archive: Path, dest: Path) -> None:
    """Unpack a zip or tar archive into ``dest`` (members cannot escape it)."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)  # zipfile drops absolute paths and '..' components
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            t.extractall(dest, filter="data")
    else:
        raise RuntimeError(f"{archive} is neither a zip nor a tar archive; delete it and rerun")


def _move_domains(staging: Path, target: Path, spec: FolderSpec) -> None:
    """Move the extracted domain folders (found at any depth up to 3) into ``target``."""
    wanted = set(spec.domains)
    parents = sorted({p.parent for p in _dirs(staging, depth=3) if p.name in wanted})
    if not parents:
        found = sorted(p.relative_to(staging).as_posix() for p in _dirs(staging, depth=2))
        raise RuntimeError(
            f"the {spec.name} archive(s) hold none of the domain folders "
            f"{', '.join(spec.domains)}; found: {', '.join(found) or 'nothing'}"
        )
    target.mkdir(parents=True, exist_ok=True)
    for parent in parents:
        for domain in sorted(wanted & {p.name for p in parent.iterdir() if p.is_dir()}):
            shutil.rmtree(target / domain, ignore_errors=True)
            shutil.move(str(parent / domain), str(target / domain))


def _dirs(root: Path, depth: int) -> list[Path]:
    found, frontier = [], [root]
    for _ in range(depth):
        frontier = [c for p in frontier for c in sorted(p.iterdir()) if c.is_dir()]
        found += frontier
    return found


def _arrange_terra_incognita(staging: Path, target: Path, spec: FolderSpec) -> None:
    """Sort camera-trap images into ``location_<id>/<category>/<file name>`` as DomainBed
    does: every annotation of an image at one of the four locations with one of the ten
    categories copies it there (an image annotated twice lands in both folders)."""
    labels = sorted(staging.rglob(TERRA_LABELS))
    if not labels:
        found = ", ".join(p.name for p in sorted(staging.rglob("*.json"))) or "no .json file"
        raise RuntimeError(f"{TERRA_LABELS} not found in the {spec.name} archives (found: {found})")
    data = json.loads(labels[0].read_text())
    categories = {c["id"]: c["name"] for c in data["categories"]}
    locations = {d.removeprefix("location_") for d in spec.domains}
    images = {im["id"]: im for im in data["images"] if str(im["location"]) in locations}
    folders = [p for p in _dirs(staging, depth=2) if p.name == TERRA_IMAGES]
    image_root = folders[0] if folders else staging
    missing = 0
    for annotation in data["annotations"]:
        image = images.get(annotation["image_id"])
        category = categories.get(annotation["category_id"])
        if image is None or category not in spec.classes:
            continue
        source = image_root / image["file_name"]
        if not source.exists():
            missing += 1
            continue
        destination = target / f"location_{image['location']}" / category / source.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if not destination.exists():
            shutil.copyfile(source, destination)
    if missing:
        warnings.warn(
            f"{spec.name}: {missing} annotated image(s) missing from the archive", stacklevel=2
        )
    absent = [d for d in spec.domains if not (target / d).is_dir()]
    if absent:
        raise RuntimeError(
            f"{spec.name}: no images for {', '.join(absent)} after sorting {TERRA_LABELS}"
        )
