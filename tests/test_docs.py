"""README.md and docs/: every relative link and #anchor resolves, and every flag a stage script's
command line shows is in that script's --help (the old spellings only in docs/training.md's note).

Fast: nothing loads a model; the scripts run only for `--help`, once each, side by side."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAIN_DOCS = [ROOT / "README.md", *DOCS]  # the newcomer's README and the reference it links to
ALL_DOCS = MAIN_DOCS + [path for path in (ROOT / "data" / "README.md", ROOT / "templates" / "README.md") if path.exists()]

STAGE_SCRIPTS = ["finetune.py", "finetune_rl.py", "generate.py", "evaluate.py", "export_checkpoint.py",
                 "data/preprocess.py", "data/download.py"]
OLD_FLAGS_NOTE = ("docs/training.md", "old-flag-names")  # the one place the old flag names may appear
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
# Flags of other tools the documents name: llama.cpp's (--temp, --jinja, --port, --lora), llama-cpp-python's
# server's (--model, --host, --n_ctx), torchrun's, pip's, rustc's.
OTHER_TOOLS_FLAGS = {"temp", "jinja", "port", "lora", "model", "host", "n_ctx", "nproc_per_node", "no-deps", "test",
                     # accelerate launch's and torchrun's, in docs/hardware.md's multi-GPU commands
                     "config_file", "num_processes", "num_machines", "machine_rank", "main_process_ip",
                     "main_process_port", "nnodes", "rdzv_backend", "rdzv_endpoint"}


# ---- Markdown: fences, headings, links --------------------------------------------------------

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def blocks(text: str):
    """(kind, info, text) of a Markdown file in order: ("code", language, body) for fenced blocks,
    ("prose", "", paragraph) for the paragraphs between them."""
    fence, info, lines, paragraph = None, "", [], []
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            if paragraph:
                yield "prose", "", "\n".join(paragraph)
                paragraph = []
            fence, info, lines = match.group(1), match.group(2).lower(), []
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                yield "code", info, "\n".join(lines)
                fence = None
            else:
                lines.append(line)
        elif line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "prose", "", "\n".join(paragraph)
            paragraph = []
    if fence is not None:
        yield "code", info, "\n".join(lines)
    if paragraph:
        yield "prose", "", "\n".join(paragraph)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text as rendered, lowercased, punctuation but `-` and
    `_` dropped, each space a `-`."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = CODE_SPAN.sub(lambda match: match.group(2), text).replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(text: str) -> list[tuple[str, str]]:
    """(slug, heading text) of every heading outside code, duplicates numbered as GitHub does."""
    seen, found = {}, []
    for kind, _, body in blocks(text):
        if kind != "prose":
            continue
        for line in body.splitlines():
            match = HEADING.match(line)
            if match:
                slug = github_slug(match.group(2))
                count = seen.get(slug, 0)
                seen[slug] = count + 1
                found.append((f"{slug}-{count}" if count else slug, match.group(2)))
    return found


def anchors(text: str) -> set[str]:
    return {slug for slug, _ in headings(text)}


def links(text: str) -> list[str]:
    """The targets of the inline links and images outside code."""
    targets = []
    for kind, _, body in blocks(text):
        if kind == "prose":
            targets += LINK.findall(CODE_SPAN.sub("code", body))
    return targets


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One line for each relative link of path whose file, or whose #anchor, does not exist."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:: not checked here
            continue
        file_part, _, anchor = target.partition("#")
        where = path if not file_part else (path.parent / file_part)
        if not where.exists():
            problems.append(f"{path.relative_to(root)}: {target}: no such file")
            continue
        if anchor:
            if where.suffix != ".md" or where.is_dir():
                problems.append(f"{path.relative_to(root)}: {target}: an anchor into a file without headings")
            elif anchor not in anchors(where.read_text(encoding="utf-8")):
                problems.append(f"{path.relative_to(root)}: {target}: no heading with that anchor")
    return problems


# ---- shell command lines and their flags -----------------------------------------------------

def shell_commands(text: str) -> list[list[str]]:
    """The words of each simple command in shell text: quotes removed, `\\` continuations joined,
    comments dropped, commands split at newlines, `;`, `&`, `|` and parentheses."""
    commands, words, word, quote, i = [], [], None, None, 0

    def end_word():
        nonlocal word
        if word is not None:
            words.append(word)
        word = None

    def end_command():
        nonlocal words
        end_word()
        if words:
            commands.append(words)
        words = []

    while i < len(text):
        c = text[i]
        if quote:
            if c == quote:
                quote = None
            else:
                word += c
        elif c in "'\"":
            quote, word = c, word or ""
        elif c == "\\" and text[i + 1:i + 2] == "\n":
            i += 1
        elif c == "\\":
            word = (word or "") + text[i + 1:i + 2]
            i += 1
        elif c == "#" and word is None:
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif c in " \t":
            end_word()
        elif c in "\n;&|()":
            end_command()
        else:
            word = (word or "") + c
        i += 1
    end_command()
    return commands


SCRIPT_WORD = re.compile(r"(?:^|/)(?:data/)?(preprocess|download)\.py$|(?:^|/)(finetune_rl|finetune|generate|evaluate|"
                         r"export_checkpoint)\.py$")


def stage_script(word: str) -> str | None:
    """The stage script a command word names (`.venv/bin/python` runs `data/preprocess.py`), if any."""
    match = SCRIPT_WORD.search(word)
    if not match or re.search(r"(?:^|/)(?:bench|tests)/", word):
        return None
    return f"data/{match.group(1)}.py" if match.group(1) else f"{match.group(2)}.py"


def command_flags(text: str) -> list[tuple[str, str]]:
    """(script, flag name) for every --flag that follows a stage script in a command of this shell
    text; what comes before the script (python, torchrun's own options) is not the script's."""
    found = []
    for words in shell_commands(text):
        script = None
        for word in words:
            if stage_script(word):
                script = stage_script(word)
            elif script and re.match(r"--[A-Za-z]", word):
                found.append((script, word[2:].split("=", 1)[0]))
    return found


def shown_flags(text: str) -> list[tuple[str, str]]:
    """(script, flag) of the stage-script command lines of a Markdown file: its shell code blocks,
    and its inline code spans (`python finetune.py --max_steps 5` in a sentence)."""
    found = []
    for kind, info, body in blocks(text):
        if kind == "code" and info in SHELL_FENCES:
            found += command_flags(body)
        elif kind == "prose":
            for match in CODE_SPAN.finditer(body):
                found += command_flags(match.group(2).replace("\n", " "))
    return found


def help_flags(help_text: str) -> set[str]:
    """The flag names fire's --help lists (`--name=NAME`, `-n, --name=NAME`)."""
    return set(re.findall(r"^\s+(?:-\w, )?--(\w+)=", help_text, re.M))


def old_flags(help_text: str) -> set[str]:
    """The old spellings --help names once: `Old flag names still work: --load_8bit (now --load_in_8bit)`."""
    line = next((line for line in help_text.splitlines() if "Old flag names still work" in line), "")
    return set(re.findall(r"--(\w+) \(now ", line))


def unknown_flags(flags: list[tuple[str, str]], known: dict[str, set[str]]) -> list[str]:
    """The (script, flag) pairs the script does not list; fire's `--noFLAG` negates a listed FLAG."""
    bad = []
    for script, flag in flags:
        listed = known[script]
        if flag == "help" or flag in listed or (flag.startswith("no") and flag[2:] in listed):
            continue
        bad.append(f"{script} --{flag}")
    return bad


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """Each stage script's --help, run once, all at once."""
    env = dict(os.environ, PAGER="cat")
    running = {script: subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for script in STAGE_SCRIPTS}
    texts = {}
    for script, process in running.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{script} --help failed:\n{output[-2000:]}"
        texts[script] = output
    return texts


# ---- the checkers, on made-up text -------------------------------------------------------------

def test_the_slug_rule_is_githubs():
    assert github_slug("The paper's recipe on a GPU") == "the-papers-recipe-on-a-gpu"
    assert github_slug("Models: what `--base_model` accepts") == "models-what---base_model-accepts"
    assert github_slug("Reinforcement learning from unit tests: finetune_rl.py") == \
        "reinforcement-learning-from-unit-tests-finetune_rlpy"
    assert github_slug("GPU: 7B-shaped bases (`bench/bench_gpu.py`)") == "gpu-7b-shaped-bases-benchbench_gpupy"
    assert github_slug("See [the docs](docs/a.md) **now**") == "see-the-docs-now"


def test_the_link_checker_finds_each_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Usage\n\n## Usage\n\n```\n# Not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n## Quick start\n\n"
        "Good: [other](docs/other.md), [usage](docs/other.md#usage), [again](docs/other.md#usage-1),\n"
        "[here](#quick-start), [web](https://example.com/none#x), [folder](docs/).\n\n"
        "Bad: [missing](docs/missing.md), [anchor](docs/other.md#nowhere), [fenced](docs/other.md#not-a-heading),\n"
        "[third usage](docs/other.md#usage-2), [in page](#quick_start).\n\n"
        "Not links: `[code](docs/missing.md)` and\n\n```\n[fenced](docs/missing.md)\n```\n")
    assert broken_links(page, root=tmp_path) == [
        "README.md: docs/missing.md: no such file",
        "README.md: docs/other.md#nowhere: no heading with that anchor",
        "README.md: docs/other.md#not-a-heading: no heading with that anchor",
        "README.md: docs/other.md#usage-2: no heading with that anchor",
        "README.md: #quick_start: no heading with that anchor",
    ]


def test_the_flag_extractor_reads_commands_as_the_shell_does():
    text = ("Run `python finetune.py --max_steps 5` or `finetune.py --cpu_speedups False`; not `--loose_flag`.\n\n"
            "```bash\n"
            ".venv/bin/torchrun --nproc_per_node 2 finetune.py --lora_r 8 \\\n"
            "    --micro_batch_size=4 && .venv/bin/python data/preprocess.py --mode strict  # --in_comment\n"
            "# python evaluate.py --commented_out\n"
            "llama-cli -m x.gguf --temp 0 -r \"### Instruction:\"\n"
            "python generate.py --instruction \"a # in quotes\" --temperature 0 | tee log\n"
            "python bench/bench_finetune.py --rounds 5\n"
            "```\n\n"
            "```python\nsubprocess.run(['python', 'evaluate.py', '--not_shell'])\n```\n")
    assert shown_flags(text) == [
        ("finetune.py", "max_steps"), ("finetune.py", "cpu_speedups"),
        ("finetune.py", "lora_r"), ("finetune.py", "micro_batch_size"), ("data/preprocess.py", "mode"),
        ("generate.py", "instruction"), ("generate.py", "temperature"),
    ]


def test_the_flag_check_reports_a_flag_the_script_does_not_list():
    known = {"finetune.py": help_flags("FLAGS\n    --max_steps=MAX_STEPS\n    -c, --check_syntax=CHECK_SYNTAX\n")}
    flags = [("finetune.py", "max_steps"), ("finetune.py", "nocheck_syntax"), ("finetune.py", "help"),
             ("finetune.py", "max_step")]
    assert unknown_flags(flags, known) == ["finetune.py --max_step"]
    assert old_flags("DESCRIPTION\n    Old flag names still work: --export_dir (now --output_dir), --dtype (now "
                      "--precision).\n") == {"export_dir", "dtype"}


# ---- the real documents ------------------------------------------------------------------------

@pytest.mark.parametrize("path", ALL_DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


def test_the_readme_is_short_keeps_its_quick_start_and_links_every_doc():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    assert "quick-start" in anchors(text)
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line for kind, info, body in blocks(quick_start) if kind == "code" for line in body.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands == ["bash run_codeup_cpu.sh", "bash setup.sh --dev --toolchains && .venv/bin/python -m pytest"]
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(text) if not target.startswith("#")}
    assert DOCS and set(DOCS) <= linked, f"README does not link {sorted(set(DOCS) - linked)}"


def test_every_shown_flag_is_in_its_scripts_help(helps):
    known = {script: help_flags(text) for script, text in helps.items()}
    for script, flags in known.items():
        assert len(flags) >= 3, f"could not read the flags of {script} --help:\n{helps[script][:2000]}"
    bad, shown = [], set()
    for path in ALL_DOCS:
        flags = shown_flags(path.read_text(encoding="utf-8"))
        shown |= {script for script, _ in flags}
        bad += [f"{path.relative_to(ROOT)}: {flag}" for flag in unknown_flags(flags, known)]
    assert bad == []
    assert shown == set(STAGE_SCRIPTS), f"no command line with flags found for {set(STAGE_SCRIPTS) - shown}"


def test_every_flag_named_in_prose_exists(helps):
    """Flag lists in sentences (`Flags: --base_model, ...`) are no command line; each name there is
    still a stage script's flag, an old spelling, or a flag of setup.sh, the benchmarks or another tool."""
    known = set(OTHER_TOOLS_FLAGS) | {"help"}
    for text in helps.values():
        known |= help_flags(text) | old_flags(text)
    for path in [ROOT / "setup.sh", *(ROOT / "bench").glob("*.py"), *(ROOT / "bench").glob("*.sh")]:
        known |= set(re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", path.read_text(encoding="utf-8")))
    unknown = [f"{path.relative_to(ROOT)}: --{match.group(1)}" for path in MAIN_DOCS
               for match in re.finditer(r"(?<![\w-])--([A-Za-z][\w-]*)(?![\w*-])", path.read_text(encoding="utf-8"))
               if match.group(1) not in known and not (match.group(1).startswith("no") and match.group(1)[2:] in known)]
    assert unknown == []


def test_old_flag_names_appear_only_in_their_note(helps):
    old = set().union(*(old_flags(text) for text in helps.values()))
    assert {"prompt_template_name", "load_8bit", "dtype", "export_dir", "only_benchmarks"} <= old
    pattern = re.compile(r"(?<![\w-])--(" + "|".join(sorted(old)) + r")(?![\w-])")
    found, elsewhere = [], []
    for path in MAIN_DOCS:
        section = ""
        for kind, _, body in blocks(path.read_text(encoding="utf-8")):
            for line in body.splitlines():
                heading = HEADING.match(line) if kind == "prose" else None
                if heading:
                    section = github_slug(heading.group(2))
                for match in pattern.finditer(line):
                    place = (str(path.relative_to(ROOT)), section)
                    (found if place == OLD_FLAGS_NOTE else elsewhere).append(f"{place[0]}#{section}: --{match.group(1)}")
    assert elsewhere == []
    assert len(found) >= len(old), "the old-flag-names note should name each old spelling"
