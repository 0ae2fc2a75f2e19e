"""Does an answer's code parse? The data stage's syntax check (preprocess.py --check_syntax).

An instruction record is worth tuning on only if the code it teaches is code: an answer whose
Python lost its indentation, or whose Java misses a brace, teaches a model to write broken code.
This module parses the code of an answer as the record's language and returns the parser's first
error, or None. Nothing is executed.

Parsers: Python's own `ast` for Python (the reference parser), tree-sitter grammars
(`tree-sitter-language-pack` 0.13, compiled into its wheel, so it works offline) for the others.

What is checked: the fenced blocks of an answer (```lang ... ```), or, when the answer has no
fence, the whole answer when it looks like code (some line has a code shape, no line reads as an
English sentence). Prose answers are not code, and never fail.

Code Alpaca's answers are often fragments (a Java method without its class, a C++ function
without includes, statements without a function around them, PHP without `<?php`, Go without a
package clause): a fragment passes when it parses in any of the usual contexts around it (see
WRAPPINGS). Its language may also be another one that the instruction names ("a SQL query in PHP"):
the caller passes those as `also`.
"""

import ast
import re
import textwrap
from functools import lru_cache

# The filter's language -> tree-sitter grammar(s); Python uses `ast`. The first grammar's error is
# the one reported; the others are tried too (C code in the C++ grammar is not always C++).
GRAMMARS = {
    "JavaScript": ["javascript", "tsx"],  # tree-sitter's javascript grammar reads JSX too
    "Java": ["java"],
    "shell": ["bash"],
    "Python": ["python"],
    "C++/C": ["cpp", "c", "objc"],  # Guesslang's C family holds Objective-C too
    "C#": ["csharp"],
    "HTML": ["html", "xml"],  # XHTML, XSLT
    "SQL": ["sql"],
    "JSON": ["json"],
    "CSS": ["css"],
    "JSX": ["javascript", "tsx"],
    "Swift": ["swift"],
    "Ruby": ["ruby"],
    "PHP": ["php"],
    "Go": ["go"],
    "Kotlin": ["kotlin"],
    "R": ["r"],
    "MATLAB": ["matlab"],
    "TypeScript": ["typescript", "tsx"],
    "Scala": ["scala"],
    "Haskell": ["haskell"],
    "Perl": ["perl"],
    "Rust": ["rust"],
}

# The contexts a fragment is usually written for: (before, after) around the code, tried in order
# after the code alone. A fragment passes when any of them parses.
WRAPPINGS = {
    "javascript": [("(", "\n)"), ("class _ {\n", "\n}"), ("function _() {\n", "\n}"), ("async function _() {\n", "\n}")],
    "tsx": [("class _ {\n", "\n}"), ("function _() {\n", "\n}")],
    "typescript": [("class _ {\n", "\n}"), ("function _() {\n", "\n}"), ("async function _() {\n", "\n}")],
    "java": [("class _ {\n", "\n}"), ("class _ { void _() {\n", "\n}}")],
    "cpp": [("void _() {\n", "\n}"), ("class _ {\n", "\n};")],
    "c": [("void _() {\n", "\n}")],
    "csharp": [("class _ {\n", "\n}"), ("class _ { void _() {\n", "\n}}")],
    "php": [("class _ {\n", "\n}"), ("function _() {\n", "\n}")],  # after the opening tag, see grammar_error
    "go": [("package main\n", ""), ("package main\nfunc _() {\n", "\n}")],
    "rust": [("fn _() {\n", "\n}"), ("impl _ {\n", "\n}")],
    "css": [("_ {\n", "\n}")],
    "swift": [("class _ {\n", "\n}")],
    "kotlin": [("class _ {\n", "\n}"), ("fun _() {\n", "\n}")],
    "scala": [("object _ {\n", "\n}")],
    "sql": [("", ";")],
    "matlab": [("", "\n")],  # the grammar wants a statement ended
}

# Fence labels -> the filter's language names (an unknown label: the block is not checked).
FENCE_LABELS = {
    "python": "Python", "py": "Python", "python3": "Python", "javascript": "JavaScript", "js": "JavaScript",
    "java": "Java", "bash": "shell", "sh": "shell", "shell": "shell", "zsh": "shell", "c++": "C++/C",
    "cpp": "C++/C", "c": "C++/C", "csharp": "C#", "cs": "C#", "c#": "C#", "html": "HTML", "sql": "SQL",
    "mysql": "SQL", "json": "JSON", "css": "CSS", "jsx": "JSX", "swift": "Swift", "ruby": "Ruby",
    "rb": "Ruby", "php": "PHP", "go": "Go", "golang": "Go", "kotlin": "Kotlin", "r": "R",
    "matlab": "MATLAB", "typescript": "TypeScript", "ts": "TypeScript", "tsx": "TypeScript",
    "scala": "Scala", "haskell": "Haskell", "perl": "Perl", "rust": "Rust", "rs": "Rust",
}
FENCE = re.compile(r"```[ \t]*([^\s`]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

# A line of an English sentence: a capitalized word first (after a list marker), then mostly words.
LIST_MARKER = re.compile(r"^(?:[-*•]|\d+[.)])\s+")
WORD = re.compile(r"^[(\"']?[A-Za-z][a-z'’-]*[,.:;!?)\"']*$")
# A line with the shape of code: ends like a statement or block, starts with a keyword, is markup,
# or assigns.
CODE_LINE = re.compile(
    r"""[;{}]\s*$|^\s*[{}<#@$]|\)\s*:\s*$|^\s*(?:def|class|import|from|for|while|if|elif|else|try|except|with|return|
    print|echo|function|var|let|const|public|private|protected|static|package|fn|func|use|using|namespace|struct|
    select|insert|update|delete|create|alter|drop|begin|end|do|done|fi|then|int|void|char|float|double|bool|string|
    console|document|System|std|module|library|val|object|sub|my|puts|require|local|export|fun|main|lambda|switch|
    case|printf|cout|cin)\b|^\s*[\w.\[\]'"]+\s*[-+*/%]?=[^=]|^\s*\w+(?:\.\w+)*\(.*\)\s*;?\s*$""",
    re.IGNORECASE | re.VERBOSE,
)


# Languages whose answers are often written in, or embedded in, another one: tried after the
# record's own (a CSS answer that is an HTML page with a <style>, HTML with <?php ... ?>).
RELATED = {
    "JavaScript": ("HTML",), "JSX": ("HTML",), "TypeScript": ("JavaScript",), "CSS": ("HTML",),
    "HTML": ("PHP", "JavaScript", "CSS"), "PHP": ("HTML",), "JSON": ("JavaScript", "Python"),
}

# SQL: the tree-sitter grammar knows standard SQL and common PostgreSQL, not every dialect's
# spelling. Frequent dialect forms are rewritten to the standard one before parsing (a rewrite
# keeps the line numbers); procedural SQL (stored procedures, triggers, T-SQL batches) is beyond
# the grammar and counted as unchecked.
UNITS = "(?:MICROSECOND|SECOND|MINUTE|HOUR|DAY|WEEK|MONTH|QUARTER|YEAR)S?"
SQL_REWRITES = [
    (re.compile(rf"\bINTERVAL\s+(-?\d+)\s+({UNITS})\b", re.I), r"INTERVAL '\1 \2'"),  # MySQL
    (re.compile(rf"\bINTERVAL\s+'([^'\n]*)'\s+({UNITS})\b", re.I), r"INTERVAL '\1 \2'"),  # Oracle
    (re.compile(r"\bSELECT(\s+DISTINCT)?\s+TOP\s*\(?\s*\d+\s*\)?(\s+PERCENT)?", re.I), r"SELECT\1 "),  # T-SQL
    (re.compile(r"\bLIMIT\s+(\d+)\s*,\s*(\d+)", re.I), r"LIMIT \2 OFFSET \1"),  # MySQL
    (re.compile(r"\bAS\s+'([^'\n]*)'", re.I), r'AS "\1"'),  # MySQL: a quoted alias
    (re.compile(r"\bAUTO_INCREMENT\b|\bAUTOINCREMENT\b", re.I), ""),
    (re.compile(r"\[(\w[\w ]*)\]"), r'"\1"'),  # T-SQL: [column name]
    (re.compile(r"(?<![:\w]):([A-Za-z_]\w*)"), r"@\1"),  # a named bind parameter (:id)
]
SQL_PROCEDURAL = re.compile(
    r"\b(?:PROCEDURE|TRIGGER|DELIMITER|DECLARE|LOOP|CURSOR|BEGIN|GO\s*$)\b|\bCREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\b",
    re.I | re.M,
)


def checkable(code: str, *, language: str) -> bool:
    """Whether a parser here reads `code` as `language`: the language has a grammar, and the code is
    not of a kind the grammar leaves out (procedural SQL)."""
    if language not in GRAMMARS:
        return False
    return not (language == "SQL" and SQL_PROCEDURAL.search(code))


def syntax_error(code: str, *, language: str, also: tuple[str, ...] = ()) -> str | None:
    """The parser's first error in `code` as `language` ("line 3: expected ..."), or None when it
    parses: alone or in one of the usual contexts of a fragment, as `language` or as one of the
    languages in `also` (other languages the instruction names). Raises KeyError for a language
    without a grammar: `has_grammar` first."""
    found = parse_error(code, language=language, also=also)
    return found and found[1]


def parse_error(code: str, *, language: str, also: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(language, its parser's first error) or None when the code parses in one of the languages.
    Of the languages tried, the error reported is the one found furthest into the code: that
    parser read the most of it, so its language is the most likely one (a "parse this HTML" answer
    in Python fails as HTML on line 1 and as Python where it is broken)."""
    code = code.strip("\n")
    errors = []
    for name in dict.fromkeys((language, *also, *RELATED.get(language, ()))):
        for grammar in GRAMMARS.get(name, []):
            error = grammar_error(code, grammar=grammar)
            if error is None:
                return None
            errors.append((name, error))
    if not errors:
        raise KeyError(f"no grammar for {language!r}")
    return max(errors, key=lambda found: error_position(found[1]))  # max keeps the first of equals


def error_position(error: str) -> tuple[int, int]:
    found = re.match(r"line (\d+)(?:, column (\d+))?", error)
    return (int(found[1]), int(found[2] or 0)) if found else (0, 0)


def has_grammar(*, language: str) -> bool:
    return language in GRAMMARS


def code_blocks(output: str, *, language: str) -> list[tuple[str, str]]:
    """(language, code) for each piece of code an answer holds: its fenced blocks (labelled with a
    language we do not know: skipped), or the whole answer when it looks like code; [] for prose."""
    if "```" in output:
        blocks = []
        for label, body in FENCE.findall(output):
            # A label we do not know (text, output, console) stays: counted as no parser for it.
            block_language = FENCE_LABELS.get(label.lower(), label) if label else language
            if body.strip():
                blocks.append((block_language, body))
        return blocks
    return [(language, output)] if looks_like_code(output) else []


def looks_like_code(text: str) -> bool:
    """Some line has the shape of code and no line reads as an English sentence: an answer that
    explains, or mixes prose with code without fences, is not parsed (its prose would fail)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return any(CODE_LINE.search(line) for line in lines) and not any(is_sentence(line) for line in lines)


def is_sentence(line: str) -> bool:
    """An unindented line that starts with a capitalized word and is mostly words: English, not code.
    Indented lines (docstrings, comments in a block) and comment lines are part of code; so is a
    line that ends like a statement."""
    if line[:1].isspace() or line.lstrip().startswith(("#", "//", "/*", "*", "--", "<!--", "%", ";")):
        return False
    tokens = LIST_MARKER.sub("", line.strip()).split()
    words = sum(bool(WORD.match(token)) for token in tokens)
    if len(tokens) >= 3 and line.rstrip()[-1] in ".?!" and words >= 0.75 * len(tokens):
        return True  # ends like a sentence
    if len(tokens) >= 12 and words >= 0.75 * len(tokens):
        return True  # too long and wordy for a line of code
    return len(tokens) >= 4 and bool(re.match(r"^[(\"']?[A-Z][A-Za-z'’]*\b", tokens[0])) and words >= 0.75 * len(tokens)


def grammar_error(code: str, *, grammar: str) -> str | None:
    """The first error of `code` in `grammar`, alone; None when it or a usual wrapping parses.
    The error reported is the one of the code alone, whose line numbers are the answer's."""
    # PHP without `<?php` is, to the PHP grammar, the text of an HTML page: any text passes. The tag
    # goes on the code's first line, so the error's line is the answer's.
    opening = "<?php " if grammar == "php" and "<?" not in code else ""
    error = first_error(opening + code, grammar=grammar)
    if error is None:
        return None
    for before, after in WRAPPINGS.get(grammar, []):
        if first_error(opening + before + code + after, grammar=grammar) is None:
            return None
    return error


def first_error(code: str, *, grammar: str) -> str | None:
    """The parser's first error, or None: `ast` for Python (and the code dedented, for a method
    copied out of its class), tree-sitter for the others."""
    if grammar == "python":
        return python_error(code)
    if grammar in ("html", "xml") and not code.lstrip().startswith("<"):
        # The HTML grammar reads any text as a page's text: markup must start with a tag.
        return "line 1, column 1: expected a tag ('<')"
    if grammar == "sql":
        for pattern, replacement in SQL_REWRITES:
            code = pattern.sub(replacement, code)
    tree = parser(grammar=grammar).parse(code.encode("utf-8"))
    if not tree.root_node.has_error:
        return None
    return describe(error_node(tree.root_node), code=code)


def python_error(code: str) -> str | None:
    error = None
    for text in dict.fromkeys((code, textwrap.dedent(code))):
        try:
            ast.parse(text)
            return None
        except SyntaxError as caught:
            error = error or f"line {caught.lineno}: {caught.msg}"
        except (ValueError, RecursionError, MemoryError) as caught:  # null bytes, absurd nesting
            error = error or f"{type(caught).__name__}: {caught}"
    return error


@lru_cache(maxsize=None)
def parser(*, grammar: str):
    """One tree-sitter parser per grammar, built once (loading a grammar is too slow to repeat per answer)."""
    from tree_sitter_language_pack import get_parser

    return get_parser(grammar)


def error_node(root):
    """The first ERROR or MISSING node in document order (tree-sitter marks where it recovered)."""
    cursor = root.walk()
    while True:
        node = cursor.node
        if node.is_error or node.is_missing:
            return node
        if node.has_error and cursor.goto_first_child():
            continue
        while not cursor.goto_next_sibling():
            if not cursor.goto_parent():
                return root


def describe(node, *, code: str) -> str:
    """`line L, column C: expected X` for a MISSING node, `unexpected "text"` for an ERROR node."""
    row, column = node.start_point
    where = f"line {row + 1}, column {column + 1}"
    if node.is_missing:
        return f"{where}: expected {node.type!r}"
    text = code.encode("utf-8")[node.start_byte:node.end_byte].decode("utf-8", "replace")
    text = " ".join(text.split())
    if len(text) > 40:
        text = text[:40] + "..."
    return f"{where}: unexpected {text!r}" if text else f"{where}: syntax error"


def check_answer(output: str, *, language: str, also: tuple[str, ...] = ()) -> tuple[str, str]:
    """("passed" | "failed" | "unchecked", detail) for a record's answer in `language`.

    `unchecked`: the answer holds no code (prose), or none a parser here reads (no grammar, or
    procedural SQL); such answers are never dropped by this check. `failed` names the language, the
    fenced block when there are several, and the parser's first error."""
    blocks = code_blocks(output, language=language)
    checked = False
    for number, (block_language, code) in enumerate(blocks, 1):
        if not checkable(code, language=block_language):
            continue
        checked = True
        found = parse_error(code, language=block_language, also=also)
        if found:
            where = f"block {number}, " if len(blocks) > 1 else ""
            return "failed", f"{found[0]} parser: {where}{found[1]}"
    return ("passed", "") if checked else ("unchecked", "no code" if not blocks else "no parser for its code")
