import pytest

from language_detection import Guesslang

SNIPPETS = {
    "Python": "import math\n\ndef circle_area(radius):\n    return math.pi * radius ** 2\n\nprint(circle_area(2.0))\n",
    "JavaScript": "const items = [3, 1, 2];\nfunction sorted(list) {\n  return [...list].sort((a, b) => a - b);\n}\nconsole.log(sorted(items));\n",
    "Java": "public class Greeter {\n    public static void main(String[] args) {\n        System.out.println(\"Hello, \" + args[0]);\n    }\n}\n",
    "SQL": "SELECT customer_id, COUNT(*) AS orders\nFROM orders\nWHERE created_at >= '2024-01-01'\nGROUP BY customer_id\nORDER BY orders DESC;\n",
    "C": "#include <stdio.h>\n\nint main(void) {\n    int total = 0;\n    for (int i = 0; i < 10; i++) total += i;\n    printf(\"%d\\n\", total);\n    return 0;\n}\n",
    "HTML": "<!DOCTYPE html>\n<html>\n  <head><title>Shop</title></head>\n  <body>\n    <ul><li>Apples</li><li>Pears</li></ul>\n  </body>\n</html>\n",
    "Shell": "#!/bin/bash\nfor file in *.log; do\n  gzip \"$file\"\n  echo \"compressed $file\"\ndone\n",
    "Go": "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tnames := []string{\"a\", \"b\"}\n\tfor _, n := range names {\n\t\tfmt.Println(n)\n\t}\n}\n",
    "Rust": "fn main() {\n    let squares: Vec<u32> = (1..=5).map(|x| x * x).collect();\n    println!(\"{:?}\", squares);\n}\n",
}


@pytest.fixture(scope="module")
def guesslang():
    return Guesslang()


def test_known_snippets_are_recognized(guesslang):
    names = guesslang.language_names(list(SNIPPETS.values()))
    assert dict(zip(SNIPPETS, names)) == {language: language for language in SNIPPETS}


def test_blank_text_has_no_answer(guesslang):
    assert guesslang.language_names(["", "   \n\t"]) == [None, None]


def test_batched_answers_equal_one_at_a_time(guesslang):
    texts = list(SNIPPETS.values()) + ["The quick brown fox.", "x = 1", "", "SELECT 1;"]
    assert guesslang.language_names(texts, batch_size=3) == [guesslang.language_names([text])[0] for text in texts]


def test_not_sure_follows_guesslangs_rule(guesslang):
    # Guesslang answers only when the best probability exceeds mean + 2 standard deviations.
    texts = list(SNIPPETS.values()) + ["ok", "1", "hello world"]
    for text, (name, _) in zip(texts, guesslang.detect(texts)):
        scores = guesslang.probabilities([text])[0]
        sure = scores.max() > scores.mean() + 2 * scores.std(ddof=1)
        assert (name is not None) == sure
        if sure:
            assert name == guesslang.languages[int(scores.argmax())]


def test_top_k_lists_the_most_probable_languages_first(guesslang):
    [(name, top)] = guesslang.detect([SNIPPETS["Python"]], top_k=3)
    assert name == "Python" and top[0] == "Python" and len(top) == 3
    assert len(guesslang.languages) == 54 and len(set(guesslang.languages)) == 54


def test_the_progress_bar_shows_only_where_it_can_redraw(guesslang, capsys, monkeypatch):
    monkeypatch.delenv("CODEUP_PROGRESS", raising=False)  # pytest's stderr is not a terminal: a log file
    guesslang.detect(list(SNIPPETS.values()), progress=True)
    assert "Guesslang" not in capsys.readouterr().err
    monkeypatch.setenv("CODEUP_PROGRESS", "1")
    guesslang.detect(list(SNIPPETS.values()), progress=True)
    assert "Guesslang" in capsys.readouterr().err
