"""The docs as a newcomer meets them (issue 18): the README short, every page reachable from
the index, every relative link and anchor resolving, and every shell block run as written.

A shell block (```sh, ```bash, ```shell, ```console) runs unless the line right before its
fence is ``<!-- not run: REASON -->``. The blocks of one page run in order in one bash, in a
fresh directory, after the README's quick-start block (marked ``<!-- mock setup -->``),
which starts ``fanout mock`` and exports the ``APNS_*`` variables that point every command
at it. A block that fails fails the test with its file and line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"sh", "bash", "shell", "console", "zsh"}
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")
SETUP = "<!-- mock setup -->"
RUN_TIMEOUT = 240.0  # one page's blocks, on 2 busy cores


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str  # the line before the fence

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{path}:{self.line}"

    @property
    def shell(self) -> bool:
        return self.lang in SHELLS

    @property
    def not_run(self) -> str | None:
        m = NOT_RUN.fullmatch(self.marker.strip())
        return m.group(1) if m else None


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(`{3,}|~{3,})\s*(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        start, mark = i, fence.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith(mark):
            j += 1
        assert j < len(lines), f"{path}:{start + 1}: a code fence that is never closed"
        out.append(Block(path, start + 1, fence.group(2).lower(), "\n".join(lines[i + 1:j]),
                         lines[start - 1] if start else ""))
        i = j + 1
    return out


def setup_block() -> Block:
    found = [b for b in blocks(README) if b.marker.strip() == SETUP]
    assert len(found) == 1, f"README.md needs exactly one block marked {SETUP}"
    return found[0]


def runnable(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.shell and b.not_run is None]


def prose(path: Path) -> str:
    """The file without its code blocks (links and headings inside code do not count)."""
    text = path.read_text(encoding="utf-8")
    return re.sub(r"^(`{3,}|~{3,}).*?^\1[^\n]*$", "", text, flags=re.S | re.M)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose(path).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


# --------------------------------------------------------------------------- the shape


def test_readme_is_short() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < 300, f"README.md has {n} lines: move reference into docs/"


def test_the_index_lists_every_page() -> None:
    index = prose(ROOT / "docs" / "README.md")
    linked = set(re.findall(r"\]\(([\w.-]+\.md)(?:#[^)]*)?\)", index))
    missing = {p.name for p in PAGES[1:]} - linked - {"README.md"}
    assert not missing, f"docs/README.md does not link {sorted(missing)}"
    assert "docs/README.md" in prose(README), "the README does not link the docs index"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path) -> None:
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)


def test_not_run_markers_say_why() -> None:
    for path in PAGES:
        for b in blocks(path):
            if NOT_RUN.search(b.marker):
                assert b.shell, f"{b.where}: a not-run marker on a {b.lang or 'plain'} block"
                assert b.not_run, f"{b.where}: a not-run marker without its reason"


def test_the_harness_catches_a_failing_block(tmp_path: Path) -> None:
    """The runner is not a test that cannot fail: a block that fails is reported by line."""
    page = tmp_path / "page.md"
    page.write_text("```sh\ntrue\n```\n\n```sh\nfanout check --port 1 --connect-timeout 1 "
                    "--unavailable-timeout 1\n```\n")
    proc = _run(runnable(page), tmp_path / "work")
    assert proc.returncode != 0
    assert "page.md:5" in proc.stderr


# --------------------------------------------------------------------------- the blocks


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APNS_", "FANOUT_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("HTTPS_PROXY", None), env.pop("ALL_PROXY", None)
    env.pop("https_proxy", None), env.pop("all_proxy", None)
    return env


def _run(page_blocks: list[Block], cwd: Path) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    setup = setup_block()
    script = ["set -euo pipefail",
              # background jobs (the mock, a server) end with the page
              "trap 'kill $(jobs -p) 2>/dev/null || true; wait || true' EXIT"]
    for b in ([setup] if setup not in page_blocks else []) + page_blocks:
        script.append(f"echo '### {b.where}' >&2")
        script.append(b.text)
    proc = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=cwd, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(timed out after {RUN_TIMEOUT:.0f} s)"
        return subprocess.CompletedProcess(proc.args, -9, out, err)
    finally:
        with_group = proc.pid
        try:
            os.killpg(with_group, signal.SIGKILL)  # anything a block left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _last_block(stderr: str) -> str:
    marks = re.findall(r"^### (\S+)$", stderr, flags=re.M)
    return marks[-1] if marks else "(before the first block)"


RUNNABLE = [p for p in PAGES if runnable(p)]


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_blocks_run(path: Path, tmp_path: Path) -> None:
    proc = _run(runnable(path), tmp_path)
    assert proc.returncode == 0, (
        f"{_last_block(proc.stderr)} failed (exit {proc.returncode})\n"
        f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}")


def test_most_pages_run_something() -> None:
    """Guards the marker: a page of commands that all say "not run" is a page nobody ran."""
    assert README in RUNNABLE
    for name in ("cli.md", "daemon.md", "mock.md"):
        assert ROOT / "docs" / name in RUNNABLE, f"docs/{name} has no block that runs"


async def test_the_mock_pages_python_example_runs(tmp_path: Path) -> None:
    """docs/mock.md's Python example, as written, against the mock it starts."""
    code = [b.text for b in blocks(ROOT / "docs" / "mock.md")
            if b.lang == "python" and "async def test_my_sender" in b.text]
    assert len(code) == 1
    namespace: dict[str, object] = {}
    exec(compile(code[0], "docs/mock.md", "exec"), namespace)  # noqa: S102
    await namespace["test_my_sender"](tmp_path)  # type: ignore[operator]
