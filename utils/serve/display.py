"""What the page shows for an answer: its code as a code block, whether or not the model fenced it.

The page renders answers as Markdown. A model tuned on Code Alpaca answers as those records are
written, with raw code and no ``` fence, and Markdown folds such code into one paragraph: line
breaks and indentation gone. `page_markdown` fences the runs of lines that are code (labelled with
the language the instruction names, so the page highlights them) and leaves prose, and answers that
hold a fence already, as they are. Only the page uses it: the CLI modes and the OpenAI-compatible
API return the model's text unchanged.

Which lines are code is the data stage's rule (data/syntax.py: a line has the shape of code, or is
not an English sentence); it imports only the standard library, so the page pays nothing for it.
"""

import re

from data.syntax import CODE_LINE, is_sentence

# A language the instruction names -> its fence label (the names Gradio's highlighter knows). The
# names and their order are data/preprocess.py's KEYWORDS (the first one named wins, JavaScript
# before Java), matched as whole words as its strict mode does; TypeScript and JSX come before
# JavaScript here only because the label is more precise. No language named: a plain code block.
NAMED_LANGUAGES = [
    ("TypeScript", "typescript"), ("JSX", "jsx"), ("JavaScript", "javascript"), ("Java", "java"),
    ("shell", "bash"), ("Python", "python"), ("C++", "cpp"), ("C#", "csharp"), ("C", "c"), ("Bash", "bash"),
    ("bash", "bash"), ("HTML", "html"), ("SQL", "sql"), ("JSON", "json"), ("CSS", "css"), ("Swift", "swift"),
    ("Ruby", "ruby"), ("PHP", "php"), ("Go", "go"), ("Kotlin", "kotlin"), ("R", "r"), ("MATLAB", "matlab"),
    ("Scala", "scala"), ("Haskell", "haskell"), ("Perl", "perl"), ("Rust", "rust"),
]
# A name as a word of its own: "Go" not in "Good", "C" not in "C++" or "C#", "Java" not in "JavaScript".
NAME_PATTERNS = [(re.compile(rf"(?<![\w+#]){re.escape(name)}(?![\w+#])"), label) for name, label in NAMED_LANGUAGES]
FENCE = "```"


def fence_label(instruction: str) -> str:
    """The fence label of the first language `instruction` names ("" when it names none)."""
    for pattern, label in NAME_PATTERNS:
        if pattern.search(instruction or ""):
            return label
    return ""


def page_markdown(answer: str, *, instruction: str = "") -> str:
    """The Markdown the page shows for `answer`: each run of lines that is code in a fenced block
    labelled with the instruction's language; prose, and an answer that holds a fence already
    (the model's own Markdown), unchanged."""
    if FENCE in answer:
        return answer
    runs = code_and_prose(answer)
    if not any(is_code for is_code, _ in runs):
        return answer
    label = fence_label(instruction)
    return "\n\n".join(f"{FENCE}{label}\n{text}\n{FENCE}" if is_code else text for is_code, text in runs)


def code_and_prose(text: str) -> list[tuple[bool, str]]:
    """`text` as runs of lines, (is_code, lines): a run of lines none of which reads as an English
    sentence is code when one of them has the shape of code; everything else is prose. Blank lines
    stay inside a run (code keeps its empty lines); those at a run's edges are dropped."""
    runs: list[tuple[bool, list[str]]] = []  # (a run of sentences, its lines)
    for line in text.splitlines():
        sentence = bool(line.strip()) and is_sentence(line)
        if runs and (not line.strip() or runs[-1][0] == sentence):
            runs[-1][1].append(line)
        else:
            runs.append((sentence, [line]))
    merged: list[tuple[bool, list[str]]] = []
    for sentence, lines in runs:
        is_code = not sentence and any(CODE_LINE.search(line) for line in lines if line.strip())
        if merged and not is_code and not merged[-1][0]:
            merged[-1][1].extend(lines)  # prose beside prose: one run, as it was written
        else:
            merged.append((is_code, list(lines)))
    return [(is_code, trimmed) for is_code, lines in merged if (trimmed := "\n".join(lines).strip("\n"))]
