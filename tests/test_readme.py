"""The README works as written: its Python blocks run, its ticketsmith command lines parse."""
import re
import shlex
from pathlib import Path

import pytest

from ticketsmith.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def commands() -> list[list[str]]:
    """Every ticketsmith invocation in the README's shell blocks, as argv after the program."""
    out = []
    for lang, body in BLOCKS:
        if lang != "sh":
            continue
        # "[--flag value]" marks an optional part: it must parse too
        for line in body.replace("\\\n", " ").replace("[", "").replace("]", "").splitlines():
            for part in re.split(r"&&|;", line):
                words = shlex.split(part.split("#", 1)[0]) if part.strip() else []
                for i, w in enumerate(words):
                    if w.endswith("ticketsmith") and i + 1 < len(words) and words[i - 1] != "-m" \
                            or (w == "ticketsmith" and i > 0 and words[i - 1] == "-m"):
                        out.append(words[i + 1:])
                        break
    return out


def test_the_readme_has_examples():
    assert len([b for lang, b in BLOCKS if lang == "python"]) >= 1
    assert len(commands()) >= 5


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    from ticketsmith.runs import RunConfig
    import dataclasses
    args = build_parser().parse_args(argv)  # argparse exits on an unknown flag or choice
    if args.command == "run":  # and the run's settings are valid together
        RunConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}).validate()


@pytest.mark.parametrize("code", [b for lang, b in BLOCKS if lang == "python"])
def test_every_readme_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
