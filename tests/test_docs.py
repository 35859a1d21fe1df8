"""Every ```bash and ```python block of README.md and docs/*.md runs as written, on the CPU, in a
fresh temporary folder (bash with the installed `alit-fast`, python with this interpreter).

A block that needs a GPU, a download or hours is preceded by the line
``<!-- docs-test: skip (reason) -->`` and reported as skipped with that reason. A long block runs
here with small sizes through an environment variable that the block itself shows (e.g.
``--steps ${ALIT_FAST_DOCS_STEPS:-300}``). Each block stands alone: it makes what it needs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*$")
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
# what the tests set so that long blocks run small; each block that reads one shows its default
SMALL_SIZES = {"ALIT_FAST_DOCS_STEPS": "2"}
README_MAX_LINES = 250


@dataclass
class Block:
    document: Path
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    skip: str | None  # the reason, when marked

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def blocks_of(document: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the skip marker on the line before, if any."""
    lines = document.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, start = opening["indent"], i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.match(before)
        found.append(Block(document, start + 1, opening["lang"], "\n".join(body) + "\n",
                           marker["reason"].strip() if marker else None))
    return found


ALL_BLOCKS = [b for d in DOCUMENTS for b in blocks_of(d)]
RUNNABLE = [b for b in ALL_BLOCKS if b.lang in ("bash", "python")]


def _environment() -> dict[str, str]:
    # as a user's shell has it: no pytest variables (scikit-image's data loader, for one, skips
    # instead of failing when it believes it runs under pytest)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # python -m benchmarks....
    env["MPLBACKEND"] = "Agg"
    env.update(SMALL_SIZES)
    return env


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_documented_block_runs_as_written(block: Block, tmp_path):
    if block.skip is not None:
        pytest.skip(block.skip)
    command = ["bash", "-euo", "pipefail", "-c", block.body] if block.lang == "bash" else [sys.executable, "-c", block.body]
    proc = subprocess.run(command, cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{block.name} failed ({proc.returncode}):\n{block.body}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_every_skip_marker_gives_a_reason_and_precedes_a_block():
    for document in DOCUMENTS:
        lines = document.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if "docs-test:" not in line:
                continue
            assert SKIP.match(line), f"{document.name}:{n + 1}: write <!-- docs-test: skip (reason) -->"
            following = next((l for l in lines[n + 1:] if l.strip()), "")
            assert FENCE.match(following), f"{document.name}:{n + 1}: the marker must come right before a code block"


def test_readme_is_short_and_its_documents_are_linked():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    for document in DOCUMENTS[1:]:
        assert f"docs/{document.name}" in readme, f"README.md does not link docs/{document.name}"


def test_the_block_reader_finds_indented_blocks_and_their_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- docs-test: skip (needs a GPU) -->\n```bash\necho hi\n```\n- item:\n\n  ```python\n"
                    "  print(1)\n  ```\n")
    first, second = blocks_of(page)
    assert (first.lang, first.skip, first.body) == ("bash", "needs a GPU", "echo hi\n")
    assert (second.lang, second.skip, second.body, second.line) == ("python", None, "print(1)\n", 8)
