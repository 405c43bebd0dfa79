"""Every relative link and image in README.md and docs/**/*.md points to a file that is in the
repository (tracked by git, or at least present when git is unavailable) and is not git-ignored:
a result the README cites must be committed, not only lying on the author's disk."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
# [text](target) and ![alt](target), optional "title"; <img src="..."> in raw HTML
_MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")


def docs() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if p.is_file()]


def relative_links(md: Path) -> list[str]:
    """Relative targets of links and images in `md` (code blocks and inline code skipped; URLs,
    mailto: and pure #anchors are not files)."""
    text = _INLINE_CODE.sub("", _FENCE.sub("", md.read_text(encoding="utf-8")))
    out = []
    for target in _MD_LINK.findall(text) + _HTML_SRC.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith(("#", "//")):
            continue
        out.append(unquote(target.split("#", 1)[0].split("?", 1)[0]))
    return [t for t in out if t]


def tracked_files() -> set[str] | None:
    """Paths tracked by git (POSIX, relative to the root), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.decode().split("\0")) - {""}


def broken_links() -> list[str]:
    tracked = tracked_files()
    broken = []
    for md in docs():
        for target in relative_links(md):
            path = (md.parent / target).resolve()
            try:
                rel = path.relative_to(ROOT).as_posix()
            except ValueError:
                broken.append(f"{md.relative_to(ROOT)}: {target} (outside the repository)")
                continue
            if path.is_dir():
                ok = tracked is None or any(t.startswith(rel + "/") for t in tracked)
            else:
                ok = path.is_file() and (tracked is None or rel in tracked)
            if not ok:
                why = "missing" if not path.exists() else "not tracked by git"
                broken.append(f"{md.relative_to(ROOT)}: {target} ({why})")
    return broken


def test_link_extraction_known_answer(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "See [results](docs/RESULTS.md#frontier) and ![plot](docs/results/a%20b.png \"t\").\n"
        "[web](https://example.org) [anchor](#top) [mail](mailto:a@b.c) <img src=\"img/c.png\">\n"
        "`[not](code.md)`\n```\n[not](fenced.md)\n```\n[nested [x]](n.md)\n"
    )
    assert sorted(relative_links(md)) == ["docs/RESULTS.md", "docs/results/a b.png", "img/c.png", "n.md"]


def test_results_folder_under_docs_is_not_ignored():
    """`.gitignore` must ignore the top-level results/ (run outputs) but not docs/results/."""
    try:
        out = subprocess.run(["git", "check-ignore", "-q", "docs/results/frontier.png"], cwd=ROOT, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git unavailable")
    assert out.returncode == 1, "docs/results/ is git-ignored: published results could never be committed"
    assert subprocess.run(["git", "check-ignore", "-q", "results/demo/x.json"], cwd=ROOT, timeout=60).returncode == 0


def test_every_relative_link_and_image_exists_in_the_repository():
    assert docs(), "README.md not found"
    broken = broken_links()
    assert not broken, "broken relative links:\n" + "\n".join(broken)
