"""Rebuild the bundled calibration corpus (quaff_fx/data/corpus/) and the extra held-out texts (quaff_fx/data/)
from the files a Debian 12 machine with CPython 3.11 and requests installed holds. Run once; the outputs are
committed, so nothing here runs at quantization time. Provenance and licences: quaff_fx/data/corpus/sources.json
and quaff_fx/data/README.md.

    apt-get install dict-devil debian-faq python3.11-doc   # besides coreutils, findutils, grep, dpkg, bash
    python tools/build_corpus.py
"""
from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "quaff_fx" / "data"
NON_LATIN = re.compile("[^\u0000-\u024f\u2000-\u206f]")  # lines with other scripts are left out
LIMIT = 60_000  # characters per calibration source: ~15k tokens each, the corpus well under 1 MB

PYTHON_FAQ = "/usr/share/doc/python3.11/html/_sources/faq/programming.rst.txt"


def gz(path: str) -> str:
    raw = Path(path).read_bytes()
    return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8", "replace")


def cut(text: str, limit: int) -> str:
    """The first ``limit`` characters, ended at a paragraph break; whitespace and hyphens in plain ASCII."""
    text = text.replace("\r", "").replace("\u00a0", " ").replace("\u2010", "-")  # no-break spaces, man's hyphens
    text = "\n".join(line for line in text.split("\n") if not NON_LATIN.search(line))  # 2 names in dpkg's changelog
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if len(text) <= limit:
        return text + "\n"
    end = text.rfind("\n\n", 0, limit)
    return text[: end if end > limit // 2 else limit] + "\n"


def man(page: str) -> str:
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"}
    out = subprocess.run(["man", "-P", "cat", page], capture_output=True, text=True, env=env, check=True).stdout
    return re.sub(r".\x08", "", out)


def devils_dictionary() -> str:
    text = gz("/usr/share/dictd/devil.dict.dz")
    start = text.index("THE DEVIL'S DICTIONARY")
    return re.sub(r"[ \t]+\n", "\n", text[start:])


def debian_faq() -> str:
    text = gz("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
    return text[text.index("The Debian GNU/Linux FAQ"):]


def requests_source() -> str:
    import requests

    root = Path(requests.__file__).parent
    return "\n\n".join(f"# ---- requests/{n} ----\n" + (root / n).read_text() for n in ("sessions.py", "adapters.py"))


def glibc_headers() -> str:
    headers = ("stdio.h", "string.h", "unistd.h")
    return "\n\n".join(f"/* ---- <{n}> ---- */\n" + Path("/usr/include", n).read_text() for n in headers)


def stdlib_source() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = ("textwrap.py", "fractions.py", "heapq.py")
    return "\n\n".join(f"# ---- Lib/{n} ----\n" + (root / n).read_text() for n in modules)


CORPUS = {  # file -> (builder, limit)
    "prose-devils-dictionary.txt": (devils_dictionary, LIMIT),
    "docs-gnu-manpages.txt": (lambda: "\n\n".join(man(p) for p in ("ls", "sort", "date", "cp", "find", "grep", "tar",
                                                                    "du",
                                                                    "stat", "cut")), LIMIT),
    "code-python-requests.txt": (requests_source, LIMIT),
    "code-c-glibc-headers.txt": (glibc_headers, LIMIT),
    "qa-debian-faq.txt": (debian_faq, LIMIT),
    "changelog-dpkg.txt": (lambda: gz("/usr/share/doc/dpkg/changelog.gz"), LIMIT),
}
HELDOUT = {  # new held-out texts (the four older bundled ones stay as they are)
    "gfdl-1.3.txt": (lambda: Path("/usr/share/common-licenses/GFDL-1.3").read_text(), 10**9),
    "python-faq.txt": (lambda: Path(PYTHON_FAQ).read_text(), 40_000),
    "python-stdlib-code.txt": (stdlib_source, 40_000),
    "bash-changes.txt": (lambda: gz("/usr/share/doc/bash/CHANGES.gz"), 40_000),
}


def main() -> int:
    for folder, table in ((DATA / "corpus", CORPUS), (DATA, HELDOUT)):
        for name, (build, limit) in table.items():
            text = cut(build(), limit)
            (folder / name).write_text(text, encoding="utf-8")
            print(f"{folder.name}/{name}: {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
