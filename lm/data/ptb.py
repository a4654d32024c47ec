"""Locate, verify and (if needed) download Mikolov's Penn Treebank.

Resolution order (first hit wins), every file checked against its known SHA-256:
1. a prepared copy under ``<data root>/ptb/{word,char}/{train,valid,test}.txt``;
2. the directory in ``data.ptb_dir`` or ``$PTB_DIR``, holding either that layout or Mikolov's
   original names (``ptb.train.txt``, ``ptb.char.train.txt``, ...);
3. a download of ``simple-examples.tgz`` from Mikolov's page, unpacked into the data root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from lm.errors import UserError

SPLITS = ("train", "valid", "test")
URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"

# SHA-256 of the byte-identical Mikolov files (see ../shared/data/ptb/MANIFEST).
SHA256 = {
    ("word", "train"): "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    ("word", "valid"): "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    ("word", "test"): "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    ("char", "train"): "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
    ("char", "valid"): "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
    ("char", "test"): "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
}


def data_root() -> Path:
    """``$FLIPOUT_LM_DATA`` or the repository's ``data/`` directory (prepared copies and caches)."""
    env = os.environ.get("FLIPOUT_LM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mikolov_name(level: str, split: str) -> str:
    return f"ptb.{split}.txt" if level == "word" else f"ptb.char.{split}.txt"


def _layout(directory: Path, level: str) -> dict[str, Path] | None:
    """The three split files of ``level`` in ``directory`` (either naming scheme), or None."""
    for names in ({s: Path(level) / f"{s}.txt" for s in SPLITS},
                  {s: Path(_mikolov_name(level, s)) for s in SPLITS},
                  {s: Path("data") / _mikolov_name(level, s) for s in SPLITS}):
        paths = {s: directory / p for s, p in names.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    return None


def verify(level: str, paths: dict[str, Path]) -> dict[str, str]:
    """Check each file's SHA-256; return the digests. Raise a one-line :class:`UserError` on mismatch."""
    digests = {}
    for split, path in paths.items():
        digest = sha256_file(path)
        if digest != SHA256[(level, split)]:
            raise UserError(f"PTB file {path} is corrupt or truncated (SHA-256 {digest[:12]}... != expected "
                            f"{SHA256[(level, split)][:12]}...): replace it with Mikolov's original")
        digests[split] = digest
    return digests


def _download(dest: Path) -> None:
    """Fetch simple-examples.tgz and unpack the six PTB files into ``dest/{word,char}/``."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "simple-examples.tgz"
        try:
            with urllib.request.urlopen(URL, timeout=30) as r, open(archive, "wb") as f:
                shutil.copyfileobj(r, f)
            with tarfile.open(archive) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for level in ("word", "char"):
                    for split in SPLITS:
                        member = members[_mikolov_name(level, split)]
                        target = dest / level / f"{split}.txt"
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(target, "wb") as out:  # type: ignore[union-attr]
                            shutil.copyfileobj(src, out)
        except (OSError, tarfile.TarError, KeyError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"PTB not found locally and download from {URL} failed ({reason}): set PTB_DIR to a "
                            "directory with word/ and char/ (or ptb.*.txt files), e.g. "
                            "export PTB_DIR=../shared/data/ptb") from None


def find_ptb(level: str, ptb_dir: str | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """Resolve and verify the PTB files of ``level`` ('word' or 'char').

    Returns:
        ``(paths, sha256)`` keyed by split.
    """
    prepared = _layout(data_root() / "ptb", level)
    if prepared is not None:
        return prepared, verify(level, prepared)
    directory = ptb_dir or os.environ.get("PTB_DIR")
    if directory:
        paths = _layout(Path(directory).expanduser(), level)
        if paths is None:
            raise UserError(f"PTB directory {directory} has no {level}/{{train,valid,test}}.txt nor "
                            f"{_mikolov_name(level, 'train')} etc.: point PTB_DIR at a PTB copy")
        return paths, verify(level, paths)
    dest = data_root() / "ptb"
    _download(dest)
    paths = _layout(dest, level)
    assert paths is not None
    return paths, verify(level, paths)
