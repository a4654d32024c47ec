"""The documentation cannot drift from the code: every Markdown file of the repository (README.md and
docs/**/*.md, found anew on every run) is checked for

* relative links (and images) that do not resolve;
* commands in fenced code blocks (``python``/``torchrun``/``bash`` lines, also behind ``$ `` prompts,
  env assignments, ``&&`` or ``for ... do``) that name a script that does not exist, a flag its
  argparse parser rejects (the real parser, captured when the script's ``main`` parses its
  arguments: nothing runs), a ``--section.key`` override or a ``--config`` the schema or
  ``configs/`` lacks; shell scripts' flags must appear in the script;
* config keys (``train.max_steps`` in prose or code, and YAML blocks made of config sections) that
  the schema lacks.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lm.config import SECTIONS, Config, flatten, resolve_config_path, to_dict

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "runs", "data", "node_modules", ".pytest_cache", "build"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
SHELL = {"", "bash", "sh", "shell", "console", "zsh"}
KEYS = set(flatten(to_dict(Config())))
KEY_REF = re.compile(r"(?<![\w/.$-])(" + "|".join(SECTIONS) + r")\.([a-z_][a-z0-9_]*)\b(?![(/]|\.[\w<])")
NOT_KEYS = {"py", "pyc", "yaml", "yml", "txt", "json", "jsonl", "md", "pt", "sh", "log", "png", "csv", "so", "c",
            "h", "model"}  # train.py, model.py, eval.txt: file names, not keys
PLACEHOLDER = re.compile(r"[$<>{}*]|^[A-Z_]+$|\.\.\.")


def markdown_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.md")):
        rel = path.relative_to(ROOT)
        if not set(rel.parts[:-1]) & SKIP_DIRS and (rel.parts[0] == "docs" or len(rel.parts) == 1):
            files.append(path)
    return files


def blocks(text: str) -> list[tuple[str, int, list[str], str]]:
    """Fenced blocks: (language, first line number, lines, the text just before the fence)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m.group(1), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[:3]):
            j += 1
        before = " ".join(lines[max(0, start - 3):start])
        out.append((m.group(2).lower(), start + 2, lines[start + 1:j], before))
        i = j + 1
    return out


def prose(text: str) -> str:
    """The text outside fenced blocks, inline code spans removed (for links)."""
    kept, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


# -- links ------------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s)://, mailto:, an anchor in the same page
        if not (path.parent / target.split("#")[0]).exists():
            bad.append(f"{path.relative_to(ROOT)}: link {target} does not resolve")
    return bad


# -- commands -----------------------------------------------------------------------------------------
class Parsed(Exception):
    """Raised instead of running a script once its parser has parsed the command line."""

    def __init__(self, namespace, rest):
        super().__init__()
        self.namespace, self.rest = namespace, rest


class Rejected(Exception):
    pass


def capture_parsers(monkeypatch) -> None:
    real_known = argparse.ArgumentParser.parse_known_args

    def error(self, message):
        raise Rejected(f"{self.prog}: {message}")

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = real_known(self, args, namespace)
        raise Parsed(ns, rest)

    def parse_args(self, args=None, namespace=None):
        ns, rest = real_known(self, args, namespace)
        if rest:
            raise Rejected(f"{self.prog}: unrecognized arguments: {' '.join(rest)}")
        raise Parsed(ns, [])

    monkeypatch.setattr(argparse.ArgumentParser, "error", error)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


def _script_main(script: Path):
    spec = importlib.util.spec_from_file_location(f"docs_check_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts guard their work with __name__ == "__main__"
    return module.main


def commands(lines: list[str]) -> list[list[str]]:
    """Shell words of each command in a block that runs a script (continuations joined, comments dropped)."""
    text = "\n".join(re.sub(r"^\s*\$ ", "", line) for line in lines).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
        except ValueError:
            continue  # not shell (an output line with a stray quote)
        segment: list[str] = []
        words = _without_redirections(words)
        for word in words + [";"]:
            if word and set(word) <= set(";&|"):
                if segment:
                    out.append(segment)
                segment = []
            else:
                segment.append(word)
    return [c for c in (_from_runner(s) for s in out) if c]


def _without_redirections(words: list[str]) -> list[str]:
    """The words of a command line less its redirections (``> file``, ``2>&1``, ``< file``)."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif re.fullmatch(r"\d?(>>?|<)", word):
            skip = True  # the file name follows
        elif not re.fullmatch(r"\d?>>?&?\S+|<\S+", word):
            out.append(word)
    return out


def _from_runner(words: list[str]) -> list[str] | None:
    """``[script, *args]`` from a segment such as ``PTB_DIR=x .venv/bin/python train.py --config y``."""
    for i, word in enumerate(words):
        name = Path(word).name
        if re.fullmatch(r"python[\d.]*", name):
            rest = words[i + 1:]
            return rest if rest and not rest[0].startswith("-") else None  # python -m / -c: a module, not a script
        if name == "torchrun":
            py = next((j for j, w in enumerate(words[i + 1:]) if w.endswith(".py")), None)
            return words[i + 1 + py:] if py is not None else None
        if name in ("bash", "sh"):
            return words[i + 1:] or None
        if re.fullmatch(r"(scripts|bench)/[\w.-]+\.(sh|py)", word):
            return words[i:]
    return None


def _clean(args: list[str]) -> list[str]:
    """Optional parts written as ``[--batch-size N]`` are given; a placeholder value (N, K, DIR) stands for 1."""
    words = [a.strip("[]") for a in args if a.strip("[]")]
    return [("1" if re.fullmatch(r"[A-Z][A-Z_]*", w) and i and words[i - 1].startswith("--")
             and words[i - 1] != "--config" else w) for i, w in enumerate(words)]


def check_command(words: list[str], path: Path, text: str) -> list[str]:
    where = f"{path.relative_to(ROOT)}: `{' '.join(words)[:90]}`"
    script, args = ROOT / words[0], _clean(words[1:])
    if not script.is_file():
        return [f"{where}: no script {words[0]}"]
    if script.suffix == ".sh":
        source = script.read_text()
        return [f"{where}: {script.name} has no option {a}" for a in args
                if a.startswith("--") and a.split("=")[0] not in source]
    try:
        main = _script_main(script)
    except AttributeError:
        return [f"{where}: {words[0]} has no main(argv) to check its arguments with"]
    try:
        main(args)
    except Parsed as parsed:
        return _check_parsed(where, script, parsed, path, text)
    except Rejected as e:
        return [f"{where}: {e}"]
    except SystemExit as e:
        return [] if e.code in (0, None) else [f"{where}: exits {e.code} before parsing"]
    return [f"{where}: the script did not parse its arguments with argparse"]


def _check_parsed(where: str, script: Path, parsed: Parsed, path: Path, text: str) -> list[str]:
    bad = []
    rest = list(parsed.rest)
    for i, word in enumerate(rest):
        if not word.startswith("--"):
            continue
        key = word[2:].split("=")[0]
        if script.name != "train.py" or key not in KEYS:
            bad.append(f"{where}: {word} is neither a flag of {script.name} nor a config key")
    config = getattr(parsed.namespace, "config", None)
    if script.name == "train.py" and config and not PLACEHOLDER.search(config):
        try:
            resolve_config_path(config)
        except Exception:  # noqa: BLE001  # a config the page itself writes (a YAML block after its name) is fine
            if not any(lang in ("yaml", "yml") and Path(config).name in before for lang, _, _, before in blocks(text)):
                bad.append(f"{where}: config {config} is neither under configs/ nor written on the page")
    return bad


# -- config keys ----------------------------------------------------------------------------------------
def unknown_keys(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    bad = [f"{path.relative_to(ROOT)}: {s}.{k} is not a config key" for line in text.splitlines()
           if "unknown config key" not in line  # an error message shown as an example
           for s, k in KEY_REF.findall(line) if k not in NOT_KEYS and f"{s}.{k}" not in KEYS]
    for lang, line, lines, _ in blocks(text):
        if lang not in ("yaml", "yml"):
            continue
        try:
            data = yaml.safe_load("\n".join(lines))
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and data and set(data) <= set(SECTIONS):
            bad += [f"{path.relative_to(ROOT)}:{line}: YAML key {k} is not a config key"
                    for k in flatten({s: v for s, v in data.items() if isinstance(v, dict)}) if k not in KEYS]
    return bad


# -- the tests ------------------------------------------------------------------------------------------
DOCS = markdown_files()


def test_the_docs_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert "README.md" in names and len([n for n in names if n.startswith("docs/")]) >= 3


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs(path, monkeypatch, capsys):
    capture_parsers(monkeypatch)
    monkeypatch.chdir(ROOT)
    text = path.read_text(encoding="utf-8")
    bad = broken_links(path) + unknown_keys(path)
    for lang, _, lines, _ in blocks(text):
        if lang in SHELL:
            for words in commands(lines):
                bad += check_command(words, path, text)
    capsys.readouterr()
    assert not bad, "\n".join(bad)


# -- the checker itself finds what it must ---------------------------------------------------------------
def test_the_checker_finds_each_kind_of_error(tmp_path, monkeypatch):
    capture_parsers(monkeypatch)
    monkeypatch.chdir(ROOT)
    page = ROOT / "docs" / "_docs_check_probe.md"
    text = ("see [the guide](no_such_page.md) and [ok](workflow.md)\n\nSet `train.max_step` or `train.max_steps`.\n\n"
            "```bash\npython train.py --config quickstart.yaml --optim.lrr 0.1\npython train.py --config nope.yaml\n"
            "python evaluate.py compare runs/x --outt y\nPTB_DIR=x python evaluate.py runs/x/best.pt --split test\n"
            "bash scripts/gpu_check.sh --out d --dry-runn\npython bench/no_such.py\n```\n\n"
            "```yaml\ntrain: {max_steps: 2, maxsteps: 3}\n```\n")
    page.write_text(text)
    try:
        bad = broken_links(page) + unknown_keys(page)
        for lang, _, lines, _ in blocks(text):
            for words in commands(lines) if lang in SHELL else []:
                bad += check_command(words, page, text)
    finally:
        page.unlink()
    joined = "\n".join(bad)
    for needle in ("link no_such_page.md", "train.max_step is not", "--optim.lrr", "config nope.yaml",
                   "unrecognized arguments: --outt", "--dry-runn", "no script bench/no_such.py", "train.maxsteps"):
        assert needle in joined, joined
    assert len(bad) == 8, joined
