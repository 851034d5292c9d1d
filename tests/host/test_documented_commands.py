"""Every command line the docs and the --help epilogs quote runs as written.

The command lines come from the tracked Markdown files (fenced blocks and `code spans`) and from
the examples epilog of every console script and `python -m` tool the docs name. Each project
command runs with `--help` appended (its real run needs a kernel, a VM or minutes of training):
that proves the program is there, can be executed, imports, and parses the options before
`--help`. A code span in prose, or a usage synopsis (`[…]`, `…`, `<x>`, a DIR/FILE
placeholder) runs its program's `--help` alone. A `make` line needs its targets to exist (in
make's database), a repo script its run bit and a shebang. Fails on a non-zero exit,
"Permission denied", "command not found", a traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SCRIPTS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
FAILURE_SIGNS = ("Traceback (most recent call last)", "Permission denied", "command not found",
                 "No such file or directory", "No rule to make target")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]{2,}[.]*$")  # DIR, FILE, SECS, GROUP…
# Words that run the command after them: wrappers and their options.
WRAPPERS = {"sudo": 0, "timeout": 1, "flock": 1, "setpriv": 0, "taskset": 1, "env": 0}


class Quote(NamedTuple):
    where: str  # file:line, or "<cmd> --help"
    line: str
    block: bool = True  # a fenced block or an epilog line; False: a code span in the prose


def doc_quotes() -> list[Quote]:
    """Every fenced-block line (backslash continuations joined) and every code span."""
    files = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, check=True, text=True,
                           capture_output=True).stdout.split()
    quotes = []
    for name in files:
        fenced, cont = False, ""
        for n, line in enumerate((ROOT / name).read_text().splitlines(), 1):
            if line.startswith("```"):
                fenced = not fenced
                continue
            if fenced:
                line = f"{cont} {line.strip()}" if cont else line.strip()
                cont = line[:-1] if line.endswith("\\") else ""
                if not cont:
                    quotes.append(Quote(f"{name}:{n}", line))
            else:
                quotes += [Quote(f"{name}:{n}", m, False) for m in re.findall(r"`([^`]+)`", line)]
    return quotes


def command_of(line: str) -> list[str] | None:
    """The words of the first command of a shell line, its wrappers, comment, redirections and
    environment assignments taken off; None when it is not a shell line."""
    line = re.split(r"\s+#", line, maxsplit=1)[0]
    line = re.split(r"\s*(?:&&|\|\||;|\||>|<(?=\s))\s*", line, maxsplit=1)[0]
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] in WRAPPERS):
        skip = WRAPPERS.get(words.pop(0), 0)
        while words and words[0].startswith("-"):
            words.pop(0)
        del words[:skip]
    return words or None


def program(words: list[str]) -> str | None:
    """What kind of project command the words run: 'script', 'module', 'make', 'file' or None."""
    name = Path(words[0]).name
    if name in SCRIPTS and (words[0] == name or Path(words[0]).parent.name == "bin"):
        return "script"
    if name in ("python", "python3") and len(words) > 2 and words[1] == "-m" \
            and words[2].split(".")[0] in ("tools", "loader", "model_dir"):
        return "module"
    if words[0] == "make" and not any(w.startswith(("-C", "-f")) for w in words):
        return "make"
    if "/" in words[0] and (ROOT / words[0]).suffix in (".py", ".sh") \
            and (ROOT / words[0]).is_file():
        return "file"
    return None


def is_synopsis(quote: Quote, words: list[str]) -> bool:
    """A usage line, or a code span in prose (it names a command or a flag, often partially)."""
    return (not quote.block or any(c in w for w in words for c in "[…<")
            or "..." in " ".join(words) or any(PLACEHOLDER.match(w) for w in words[1:]))


def run(words: list[str]) -> subprocess.CompletedProcess[str]:
    if words[0].startswith(".venv/bin/"):  # the checkout's venv: whichever runs this test
        words = [str(VENV_BIN / Path(words[0]).name), *words[1:]]
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    return subprocess.run(words, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)


def epilog_quotes(head: list[str]) -> list[Quote]:
    """The lines of head's --help that run head itself (its examples)."""
    out = run([*head, "--help"]).stdout
    name = " ".join(head if head[0] in SCRIPTS else ["python", *head[1:]])
    return [Quote(f"{name} --help", ln.strip()) for ln in out.splitlines()
            if re.match(rf"\s*(sudo\s+)?{re.escape(name)}(\s|$)", ln)]


def make_targets() -> set[str]:
    """The Makefile's targets, from make's own database (-p; -q runs nothing, the `:` goal
    has no rule: make only parses)."""
    db = subprocess.run(["make", "-pRrq", ":"], cwd=ROOT, text=True, capture_output=True,
                        timeout=60).stdout
    return {t for m in re.finditer(r"^([^\s#%=:][^=:]*?):(?!=)", db, re.M) for t in m[1].split()}


def all_commands() -> list[tuple[Quote, list[str], str]]:
    found = []
    for q in doc_quotes():
        words = command_of(q.line)
        kind = program(words) if words else None
        # A file named alone in prose is a reference to it, not a command.
        if kind and words and (kind != "file" or q.block or len(words) > 1):
            found.append((q, words, kind))
    heads = sorted({tuple(w[:1] if k == "script" else ["python", *w[1:3]])
                    for _, w, k in found if k in ("script", "module")} | {(s,) for s in SCRIPTS})
    for head in heads:
        for q in epilog_quotes(list(head)):
            words = command_of(q.line)
            if words and (kind := program(words)):
                found.append((q, words, kind))
    return found


COMMANDS = all_commands()


def test_the_docs_quote_commands() -> None:
    # The extraction itself must find the README's and model_dir's commands, or this file
    # would pass on nothing.
    kinds = {k for _, _, k in COMMANDS}
    assert {"script", "module", "make"} <= kinds, kinds
    assert len(COMMANDS) > 40, len(COMMANDS)


@pytest.mark.parametrize(("quote", "words", "kind"), COMMANDS,
                         ids=[f"{q.where}: {q.line[:60]}" for q, _, _ in COMMANDS])
def test_documented_command_runs(quote: Quote, words: list[str], kind: str) -> None:
    if kind == "file":
        path = ROOT / words[0]
        assert os.access(path, os.X_OK), f"{quote.where}: {words[0]} is quoted as a command " \
            "but has no run bit"
        assert path.read_text().startswith("#!"), f"{quote.where}: {words[0]} has no shebang"
        return
    if kind == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        missing = [t for t in targets if t not in make_targets()]
        assert not missing, f"{quote.where}: `{quote.line}`: no make target {missing}"
        return
    else:
        head = words[:1] if kind == "script" else words[:3]
        res = run([*(head if is_synopsis(quote, words) else words), "--help"])
    output = res.stdout + res.stderr
    for sign in FAILURE_SIGNS:
        assert sign not in output, f"{quote.where}: `{quote.line}`: {sign}\n{output[-2000:]}"
    assert res.returncode == 0, f"{quote.where}: `{quote.line}` exit {res.returncode}\n" \
        f"{output[-2000:]}"
