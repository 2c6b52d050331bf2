"""The README and the docs (fastres/docs/*.md) cannot rot: every Python block runs, and every
`fastres` command they show exists with the flags it is shown with.

- Every fenced block names its language (```python, ```bash, ```text, ...), so none escapes
  the checks below by accident.
- Every ```python block runs as a script in a fresh process (CPU; the Triton kernels through
  the interpreter, as in the other tests) and must exit 0 having printed something. The one
  way out is a `<!-- ci:skip: REASON -->` line right above the block, with a reason a
  reviewer accepts ("needs a GPU"); it shows as a skip with that reason. Keep those rare.
- `<!-- ci:example -->` above a block marks a complete program a reader may copy; the README
  holds exactly one, the Session example. (Marked or not, every block runs.)
- In ```bash blocks and in inline code that starts with `fastres `, every `fastres COMMAND`
  (also `python -m fastres COMMAND`, `torchrun ... -m fastres COMMAND`) must be a real
  subcommand, every `--flag` after it on the same command line must be one of that
  subcommand's options (its `get_args_parser()`, exact names), every `--set SECTION.KEY=V`
  a config field, and every `--preset` / `--model(s)` value a preset / registered model
  (an UPPERCASE value is a placeholder and is not checked).
- Every relative link resolves, and the README stays a five-minute read (<= 300 lines).
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "fastres" / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 300

# A fence: optional indentation (a block inside a list item), ``` and an info string.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.S | re.M)
MARKER = re.compile(r"<!--\s*ci:(?P<kind>[a-z-]+)(?::(?P<arg>.*?))?\s*-->")
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}
OTHER = {"text", "toml", "json", "diff", "markdown"}
MARKER_KINDS = {"example": PYTHON, "skip": PYTHON, "test-command": SHELL,
                "main-command": SHELL}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int              # line of the opening fence (1-based)
    lang: str
    code: str
    marker: str | None     # "example", "skip", "test-command", ... or None
    marker_arg: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip().rsplit("\n", 1)[-1].strip()
        mk = MARKER.fullmatch(before)
        out.append(Block(page, line, m.group("info").strip().lower(),
                         textwrap.dedent(m.group("body")),
                         mk.group("kind") if mk else None,
                         (mk.group("arg") or "").strip() if mk else ""))
    return out


ALL = [b for p in PAGES for b in blocks(p)]
PY = [b for b in ALL if b.lang in PYTHON]


def test_the_pages_exist_and_the_readme_is_short():
    assert DOCS.is_dir() and len(PAGES) > 1, "fastres/docs/*.md is missing"
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, (f"README.md is {n} lines; keep it <= {README_MAX_LINES} "
                                   "and move reference material to fastres/docs/")


def test_every_block_names_its_language_and_every_marker_its_block():
    for b in ALL:
        assert b.lang in PYTHON | SHELL | OTHER, (
            f"{b.where}: a fenced block without a known language ({b.lang!r}); write "
            "```python (run), ```bash (commands checked) or ```text (output)")
        if b.marker:
            assert b.marker in MARKER_KINDS, f"{b.where}: unknown marker ci:{b.marker}"
            assert b.lang in MARKER_KINDS[b.marker], (
                f"{b.where}: ci:{b.marker} above a {b.lang} block")
        if b.marker == "skip":
            assert len(b.marker_arg) >= 8, f"{b.where}: ci:skip needs a reason"
    for page in PAGES:  # a marker that is not right above a fence marks nothing
        text = page.read_text()
        for m in MARKER.finditer(text):
            rest = text[m.end():].lstrip("\n ")
            assert rest.startswith("```"), (
                f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: "
                f"{m.group(0)} is not right above a fenced block")


def test_the_readme_has_one_library_example_the_session():
    py = [b for b in PY if b.page == README]
    assert len(py) == 1 and py[0].marker == "example", \
        "README.md holds exactly one Python block, marked <!-- ci:example -->"
    assert "Session(" in py[0].code


@pytest.mark.parametrize("block", PY, ids=lambda b: b.where)
def test_python_block_runs(block, tmp_path):
    if block.marker == "skip":
        pytest.skip(f"{block.where}: {block.marker_arg}")
    script = tmp_path / "example.py"
    script.write_text(block.code)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{block.where} failed:\n{r.stdout}\n{r.stderr}"
    assert r.stdout.strip(), f"{block.where} printed nothing"


# ------------------------------------------------------------------ commands and flags

@functools.lru_cache(maxsize=None)
def options(command: str) -> frozenset[str]:
    from fastres.tools.cli import COMMANDS

    module = importlib.import_module(COMMANDS[command][0])
    return frozenset(o for o in module.get_args_parser()._option_string_actions)


@functools.lru_cache(maxsize=None)
def known(kind: str) -> frozenset[str]:
    if kind == "preset":
        from fastres.config import list_presets

        return frozenset(list_presets())
    if kind == "model":
        from fastres.models import list_models

        return frozenset(list_models())
    from fastres.config import describe  # (key, type, default, help) of every field

    return frozenset(row[0] for row in describe())


INVOCATION = re.compile(r"(?:^|[\s(])fastres\s+(?P<cmd>[a-z][a-z0-9-]*)(?P<rest>.*)")


def command_lines(text: str) -> list[str]:
    """Command lines of a shell block: continuations joined, comments dropped, split at
    `&&`, `||`, `;` and `|`."""
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line)
        out += [part for part in re.split(r"&&|\|\||;|\|", line) if part.strip()]
    return out


def uses() -> list[tuple[str, str]]:
    """(where, command line) of every `fastres COMMAND ...` the pages show."""
    found = []
    for page in PAGES:
        for b in blocks(page):
            if b.lang in SHELL:
                found += [(b.where, c) for c in command_lines(b.code) if INVOCATION.search(c)]
        text = FENCE.sub("", page.read_text())
        for m in re.finditer(r"`(fastres [^`\n]+)`", text):
            if INVOCATION.search(m.group(1)):  # not `fastres COMMAND` (a placeholder)
                found.append((f"{page.relative_to(ROOT)} (inline)", m.group(1)))
    return found


def problems(line: str) -> list[str]:
    from fastres.tools.cli import COMMANDS

    m = INVOCATION.search(line)
    cmd, rest = m.group("cmd"), m.group("rest")
    if cmd not in COMMANDS:
        return [f"`fastres {cmd}` is not a subcommand (choose from {', '.join(COMMANDS)})"]
    opts, out = options(cmd), []
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    words = [w.strip("[]") for w in words]
    for i, w in enumerate(words):
        if not w.startswith("--") or w == "--":
            continue
        flag, _, inline = w.partition("=")
        if flag not in opts:
            out.append(f"`fastres {cmd}` has no option {flag}")
            continue
        value = inline or (words[i + 1] if i + 1 < len(words) else "")
        if not value or value.startswith("-") or value.isupper() or "..." in value:
            continue
        if flag == "--set":
            key = value.split("=", 1)[0]
            if key not in known("field"):
                out.append(f"--set {key}: no such config field")
        elif flag == "--preset" and value not in known("preset"):
            out.append(f"--preset {value}: no such preset")
        elif flag in ("--model", "--models"):
            bad = [v for v in value.split(",") if v and not v.isupper()
                   and v not in known("model")]
            if bad:
                out.append(f"{flag} {','.join(bad)}: no such model")
    return out


def test_the_pages_show_commands():
    assert len(uses()) > 20


def test_every_command_and_flag_shown_exists():
    bad = [f"{where}: {p}\n    {line.strip()}" for where, line in uses()
           for p in problems(line)]
    assert not bad, "commands in the README/docs that do not exist:\n" + "\n".join(bad)


def test_the_flag_check_catches_a_wrong_flag():
    assert problems("fastres train --preset speedrun --out runs/x") == []
    assert problems("fastres train --presett speedrun") == ["`fastres train` has no option "
                                                           "--presett"]
    assert problems("fastres trian --out x")[0].startswith("`fastres trian` is not")
    assert problems("fastres train --set optim.lrr=1") == ["--set optim.lrr: no such config "
                                                          "field"]
    assert problems("python -m fastres profile --model resnet2O")[0].endswith("no such model")


# ------------------------------------------------------------------ links

def anchors(page: Path) -> set[str]:
    """The #fragments a Markdown renderer (GitHub's rule) gives the page's headings."""
    out = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_every_relative_link_resolves():
    bad = []
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            target, _, fragment = m.group(1).partition("#")
            if re.match(r"[a-z]+:", target):
                continue
            path = (page.parent / target) if target else page
            if not path.exists():
                bad.append(f"{page.relative_to(ROOT)}: {m.group(1)} (no such file)")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                bad.append(f"{page.relative_to(ROOT)}: {m.group(1)} (no such heading)")
    assert not bad, "links to nothing:\n" + "\n".join(bad)
