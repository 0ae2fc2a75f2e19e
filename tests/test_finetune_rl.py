"""finetune_rl.py: problems in, bad input out in one line, the sandbox's verdict as the reward, and an
adapter that the other stages take as they take finetune.py's."""

import json
import os

import pytest

import finetune_rl
from conftest import SHARED_DATA
from utils.cli import run_cli
from utils.eval.multilingual import check_toolchain
from utils.eval.programs import build_program, mbpp_problem
from utils.eval.sandbox import run_programs
from utils.errors import CodeUpError
from utils.train import rewards

MBPP = SHARED_DATA / "mbpp.jsonl"
EASY = [
    {"task_id": "double", "prompt": "Write a Python function `double(x)` that returns x times 2.",
     "tests": "assert double(2) == 4\nassert double(0) == 0\n", "solution": "def double(x):\n    return 2 * x\n"},
    {"task_id": "is_even", "prompt": "Write a Python function `is_even(n)` that returns True when n is even.",
     "tests": "assert is_even(2)\nassert not is_even(3)\n"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def reward_of(problems, completions, *, reward="pass"):
    scorer = rewards.SandboxReward(problems, response_of=lambda text: text, reward=reward, timeout=3.0)
    ids = [task_id for task_id, _ in completions]
    return scorer(completions=[text for _, text in completions], task_id=ids), scorer.pass_rate(task_id=ids)


# ---- the reward ------------------------------------------------------------------------------------

def test_python_reward_is_the_verdict_and_fraction_counts_asserts():
    problems = [{**EASY[0], "tests": "assert double(2) == 4\nassert double(0) == 0\nassert double(1) == 3\n",
                 "language": "python"}]
    answers = [("double", "def double(x):\n    return 2 * x\n"), ("double", "def double(x):\n    return x\n"),
               ("double", "def double(x) return"), ("double", "Here:\n```python\ndef double(x):\n    return 2 * x\n```\nIt doubles x.")]
    scores, passed = reward_of(problems, answers)
    assert scores == [0.0, 0.0, 0.0, 0.0] and passed == [0.0] * 4  # the third assert is wrong for everyone
    scores, passed = reward_of(problems, answers, reward="fraction")
    # 2x passes 2 of 3; x passes double(0) only; a syntax error none; the fenced 2x (prose around it) 2 of 3.
    assert scores == pytest.approx([2 / 3, 1 / 3, 0.0, 2 / 3]) and passed == [0.0] * 4


def test_fraction_leaves_out_the_asserts_the_prompt_shows():
    """An answer that returns the shown assert's expected value as a constant earns nothing (what
    SmolLM2 learned on mbpp-train while the shown assert counted); one that is right earns 1."""
    tests = "assert double(2) == 4\nassert double(0) == 0\nassert double(5) == 10\n"
    shown = {**EASY[0], "language": "python", "tests": tests,
             "prompt": "Write `double(x)`. Your code should pass this test:\nassert double(2) == 4"}
    all_shown = {**shown, "task_id": "all shown", "prompt": "Write `double(x)`:\n" + tests}
    answers = [("double", "def double(x):\n    return 4\n"), ("double", "def double(x):\n    return 2 * x\n"),
               ("double", "def double(x):\n    return 0\n"),
               ("all shown", "def double(x):\n    return 4\n"), ("all shown", "def double(x):\n    return 2 * x\n")]
    scores, passed = reward_of([shown, all_shown], answers, reward="fraction")
    # The constant 4 passes only the shown assert: 0 of the 2 hidden; the constant 0 passes one of
    # them; when the prompt shows every assert, all count (the constant 4 passes 1 of 3).
    assert scores == pytest.approx([0.0, 1.0, 0.5, 1 / 3, 1.0]) and passed == [0.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.skipif(not MBPP.is_file(), reason="../shared/data is not here")
def test_the_constant_answers_rl_learned_on_mbpp_train_earn_nothing():
    """Answers finetune_rl.py --reward fraction taught SmolLM2 before the shown assert was left out
    (MBPP-test samples after 60 steps): each returns the shown assert's value and scored 1/3."""
    tasks = {int(t["task_id"]): t for t in rewards.load_mbpp(str(MBPP)) if int(t["task_id"]) in (11, 13, 14)}
    problems = [rewards.mbpp_train_problem(tasks[i]) for i in (11, 13, 14)]
    answers = [("MBPP/11", 'def remove_Occ(str, char):\n    return "heo"'), ("MBPP/13", "def count_common(d):\n    return 4"),
               ("MBPP/14", "def find_Volume(n, m, k):\n    return 240")]
    assert reward_of(problems, answers, reward="fraction")[0] == [0.0, 0.0, 0.0]
    assert reward_of(problems, [(p["task_id"], tasks[i]["code"]) for p, i in zip(problems, (11, 13, 14))],
                     reward="fraction")[0] == [1.0, 1.0, 1.0]


@pytest.mark.skipif(not MBPP.is_file(), reason="../shared/data is not here")
def test_reward_equals_evaluates_verdict_on_mbpp_answers():
    """The same answers to MBPP problems: reward (through an mbpp-train problem) == evaluate.py's verdict."""
    tasks = [t for t in rewards.load_mbpp(str(MBPP)) if int(t["task_id"]) in (11, 12, 600, 601)]
    answers = []
    for task in tasks:
        answers += [task["code"], "def nothing():\n    pass\n", task["code"].replace("return", "return None and", 1)]
    problems = [rewards.mbpp_train_problem(t) for t in tasks]
    completions = [(p["task_id"], a) for p in problems for a in answers[3 * problems.index(p):3 * problems.index(p) + 3]]
    scores, _ = reward_of(problems, completions)
    programs = [build_program("mbpp", mbpp_problem(t), a) for t in tasks for a in answers[3 * tasks.index(t):3 * tasks.index(t) + 3]]
    verdicts = [float(o.passed) for o in run_programs(programs, progress=False)]
    assert scores == verdicts and 1.0 in scores and 0.0 in scores


def toolchain_here(key):
    try:
        check_toolchain(key, "multiple")
        return True
    except CodeUpError:
        return False


# Right, wrong, not compiling, never ending: per language (the tests follow the answer in one file).
LANGUAGE_CASES = {
    "js": ("const assert = require('assert');\nassert.strictEqual(add(1, 2), 3);\n",
           ["function add(a, b) { return a + b; }", "function add(a, b) { return a - b; }",
            "function add(a, b) { return a + ; }", "function add(a, b) { while (true) {} }"]),
    "cpp": ("#include <cassert>\nint main() { assert(add(1, 2) == 3); return 0; }\n",
            ["int add(int a, int b) { return a + b; }", "int add(int a, int b) { return a - b; }",
             "int add(int a, int b) { return a + ; }", "int add(int a, int b) { while (true) {} return 0; }"]),
    "go": ('import "testing"\nfunc TestAdd(t *testing.T) { if add(1, 2) != 3 { t.Fatal("wrong") } }\n',
           ["func add(a int, b int) int { return a + b }", "func add(a int, b int) int { return a - b }",
            "func add(a int, b int) int { return a + }", "func add(a int, b int) int { for {} }"]),
    "rust": ("fn main() { assert_eq!(add(1, 2), 3); }\n",
             ["fn add(a: i32, b: i32) -> i32 { a + b }", "fn add(a: i32, b: i32) -> i32 { a - b }",
              "fn add(a: i32, b: i32) -> i32 { a + }", "fn add(a: i32, b: i32) -> i32 { loop {} }"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("language", sorted(LANGUAGE_CASES))
def test_right_answers_score_1_and_wrong_broken_or_endless_ones_0(language):
    if not toolchain_here(language):
        if os.environ.get("CI"):
            pytest.fail(f"{language}: toolchain missing in CI (setup.sh --toolchains)")
        pytest.skip(f"{language}: toolchain not installed")
    tests, answers = LANGUAGE_CASES[language]
    problem = {"task_id": language, "prompt": "add", "tests": tests, "language": language}
    scores, _ = reward_of([problem], [(language, a) for a in answers])
    assert scores == [1.0, 0.0, 0.0, 0.0]


HOSTILE = {
    "fork": "import os\nwhile True:\n    os.fork()\n",
    "sleep": "import time\ntime.sleep(30)\n",
    "flood": "print('x' * 10**9)\n",
    "write outside": "open('/tmp/codeup_rl_escaped', 'w').write('x')\n",
    "socket": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\ndef double(x):\n    return 2 * x\n",
    # This test's own process (the trainer's, in a run): invisible from the sandbox.
    "other processes": f"open('/proc/{os.getpid()}/environ').read()\ndef double(x):\n    return 2 * x\n",
}


@pytest.mark.slow
def test_hostile_answers_score_0_and_leave_nothing_behind():
    escaped = "/tmp/codeup_rl_escaped"
    if os.path.exists(escaped):
        os.remove(escaped)
    problems = [{**EASY[0], "language": "python"}]
    scores, _ = reward_of(problems, [("double", code) for code in HOSTILE.values()] + [("double", EASY[0]["solution"])])
    assert scores == [0.0] * len(HOSTILE) + [1.0]  # and the step went on: the last answer was still scored
    assert not os.path.exists(escaped)


# ---- problems ------------------------------------------------------------------------------------

def test_problems_are_decontaminated_and_failing_solutions_dropped(tmp_path):
    humaneval = rewards.load_humaneval()[0]
    planted = {"task_id": "planted", "prompt": humaneval["prompt"], "tests": "assert True\n"}
    broken = {"task_id": "broken", "prompt": "Return the last element.", "tests": "assert last([1, 2]) == 2\n",
              "solution": "def last(xs):\n    return xs[0]\n"}
    problems = rewards.load_problems(str(write_jsonl(tmp_path / "p.jsonl", [*EASY, planted, broken])), mbpp_path=str(MBPP))
    kept, dropped = rewards.decontaminate(problems, sources=rewards.benchmark_sources(mbpp_path=str(MBPP), decontaminate_with=[]))
    assert [p["task_id"] for p in kept] == ["double", "is_even", "broken"]
    assert list(dropped.values()) == [["planted"]] and "HumanEval" in next(iter(dropped))
    kept, failing = rewards.check_solutions(kept, timeout=3.0)
    assert [p["task_id"] for p in kept] == ["double", "is_even"] and failing == ["broken"]


@pytest.mark.skipif(not MBPP.is_file(), reason="../shared/data is not here")
def test_mbpp_train_is_the_train_and_validation_splits_only():
    problems = rewards.load_problems("mbpp-train", mbpp_path=str(MBPP))
    ids = [int(p["task_id"].split("/")[1]) for p in problems]
    assert min(ids) == 511 and max(ids) == 974 and len(ids) == 464
    kept, dropped = rewards.decontaminate(problems, sources=rewards.benchmark_sources(mbpp_path=str(MBPP), decontaminate_with=[]))
    assert len(kept) > 400  # the test split is not the train split: few overlap


def run_rl(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(finetune_rl.main, argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case, expected", [
    ("missing", "not found"),
    ("binary", "not UTF-8 text"),
    ("no tests", "no 'tests'"),
    ("unknown language", "unknown language 'cobol'"),
    ("all contaminated", "every problem overlaps a benchmark"),
    ("one generation", "--num_generations must be at least 2"),
    ("not an adapter", "no adapter_config.json"),
    ("no sandbox", "no sandbox on this machine"),
    ("another model's adapter", "is not an adapter of"),
])
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, tiny_llama_dir, case, expected):
    monkeypatch.setattr(finetune_rl, "load_tokenizer", lambda *a, **k: pytest.fail("a model part loaded"))
    data = write_jsonl(tmp_path / "p.jsonl", EASY)
    argv = ["--data_path", str(data), "--mbpp_path", str(MBPP), "--output_dir", str(tmp_path / "out")]
    if case == "missing":
        argv[1] = str(tmp_path / "nothing.jsonl")
    elif case == "binary":
        data.write_bytes(b"\x00\x80\xff" * 50)
    elif case == "no tests":
        write_jsonl(data, [{"task_id": "x", "prompt": "p"}])
    elif case == "unknown language":
        write_jsonl(data, [{**EASY[0], "language": "cobol"}])
    elif case == "all contaminated":
        write_jsonl(data, [{"task_id": "he", "prompt": rewards.load_humaneval()[3]["prompt"], "tests": "assert True\n"}])
    elif case == "one generation":
        argv += ["--num_generations", "1"]
    elif case == "not an adapter":
        argv += ["--lora_weights", str(tmp_path)]
    elif case == "another model's adapter":  # a LoRA for a 999-wide q_proj: the tiny Llama's is 64 wide
        from safetensors.torch import save_file
        import torch

        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 999)},
                  str(adapter / "adapter_model.safetensors"))
        argv += ["--lora_weights", str(adapter), "--base_model", str(tiny_llama_dir)]
    elif case == "no sandbox":  # as without root and bubblewrap
        monkeypatch.setattr("utils.eval.sandbox.probe_isolation", lambda: "rlimits")
    assert expected in run_rl(argv, capsys)
    assert not (tmp_path / "out").exists()


# ---- the faster inner steps (utils/train/grpo.py) -------------------------------------------------

def test_linear_log_probs_equal_the_log_softmax_and_its_gradient(monkeypatch):
    import torch

    from utils.train import loss

    monkeypatch.setitem(loss.CHUNK_ELEMENTS, "cpu", 3 * 50)  # chunks of 16 tokens (the floor): several chunks
    torch.manual_seed(0)
    hidden = torch.randn(2, 21, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64)
    targets = torch.randint(0, 50, (2, 21))
    upstream = torch.randn(2, 21, dtype=torch.float64)
    log_probs, entropy = loss.linear_log_probs(hidden, weight, targets, temperature=0.7)
    (log_probs * upstream).sum().backward()
    chunked_grad = hidden.grad.clone()
    hidden.grad = None
    reference = torch.log_softmax((hidden @ weight.T / 0.7).float(), dim=-1)
    expected = reference.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (expected * upstream.float()).sum().backward()
    assert torch.allclose(log_probs, expected, atol=1e-5)
    assert torch.allclose(entropy, -(reference.exp() * reference).sum(-1), atol=1e-5)
    assert not entropy.requires_grad
    assert torch.allclose(chunked_grad, hidden.grad, atol=1e-5)


def test_inverse_cdf_sampling_draws_from_the_softmax_and_leaves_one_token():
    import torch

    from utils.train.grpo import InverseCdfSample

    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(40000, 1)
    kept = InverseCdfSample(torch.Generator().manual_seed(0))(None, scores)
    assert torch.equal((kept == 0).sum(dim=1), torch.ones(40000, dtype=torch.long))
    drawn = kept.argmax(dim=1)
    frequencies = torch.bincount(drawn, minlength=5).double() / 40000
    expected = torch.softmax(scores[0].double(), dim=0)
    # 40,000 draws: each frequency within 4 standard errors (sqrt(p(1-p)/n) <= 0.0025) of its probability;
    # the impossible token is never drawn.
    assert torch.all((frequencies - expected).abs() < 0.01) and frequencies[4] == 0


def test_the_policys_log_probabilities_and_gradients_equal_trls(tmp_path, tiny_llama_dir):
    """SandboxGRPOTrainer's chunked log-probabilities against GRPOTrainer's own (its fused head), fp32
    (TRL's bf16 default off): the values, the entropies, and the LoRA gradients of the same surrogate."""
    import torch

    from utils.model_loading import load_tokenizer
    from utils.prompter import Prompter

    tokenizer = load_tokenizer(str(tiny_llama_dir), padding_side="left")
    model = finetune_rl.policy_model(base_model=str(tiny_llama_dir), lora_weights="", load_in_8bit=False,
                                     load_in_4bit=False, dtype=torch.float32)
    problems = [{**EASY[0], "language": "python"}]
    reward = rewards.SandboxReward(problems, response_of=Prompter("alpaca").response_from_continuation)
    dataset = finetune_rl.prompt_dataset(problems, prompter=Prompter("alpaca"))
    trainer = finetune_rl.build_trainer(
        model=model, tokenizer=tokenizer, dataset=dataset, reward_function=reward,
        new_adapter=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        config=dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                    max_completion_length=6, temperature=0.8, use_cpu=True, bf16=False, report_to="none"))
    for name, parameter in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)  # a trained adapter, not zeros
    torch.manual_seed(0)
    input_ids = torch.randint(3, tokenizer.vocab_size, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # a left-padded row
    results = {}
    for chunked in (True, False):
        trainer.chunked_loss = chunked
        trainer.model.zero_grad()
        log_probs, entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, 5, compute_entropy=True)
        (log_probs * torch.linspace(-1, 1, 15).view(3, 5)).sum().backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[chunked] = (log_probs.detach(), entropy.detach(), grads)
    (ours, our_entropy, our_grads), (trls, trl_entropy, trl_grads) = results[True], results[False]
    assert ours.shape == trls.shape == (3, 5)
    assert torch.allclose(ours, trls, atol=1e-5) and torch.allclose(our_entropy, trl_entropy, atol=1e-5)
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) == 8  # 2 layers x q, v x A, B
    assert all(torch.allclose(our_grads[n], trl_grads[n], atol=1e-6, rtol=1e-4) for n in our_grads)


# ---- a run ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_short_run_writes_an_adapter_the_other_stages_take(tmp_path, tiny_llama_dir):
    import export_checkpoint
    from utils.serve.generation import Generator

    data = write_jsonl(tmp_path / "p.jsonl", EASY)
    output = tmp_path / "rl"
    finetune_rl.train(base_model=str(tiny_llama_dir), data_path=str(data), mbpp_path=str(MBPP), output_dir=str(output),
                      max_steps=2, prompts_per_step=2, num_generations=2, max_completion_length=8, save_steps=1,
                      precision="fp32")
    state = json.loads((output / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "rewards/sandbox_pass/mean" in entry]
    assert len(logged) == 2 and all(0.0 <= e["rewards/pass_rate/mean"] <= 1.0 for e in logged)
    assert (output / "reward.png").stat().st_size > 0 and (output / "checkpoint-2" / "checkpoint_complete").is_file()
    assert json.loads((output / "prompt_template.json").read_text())["name"] == "alpaca"
    generator = Generator(str(tiny_llama_dir), str(output))
    assert generator.prompter.template["prompt_no_input"].startswith("Below is an instruction")
    export_checkpoint.main(base_model=str(tiny_llama_dir), lora_weights=str(output), output_dir=str(tmp_path / "export"),
                           precision="float32")
    assert (tmp_path / "export" / "hf_ckpt" / "config.json").is_file()


# Problems the embedded model solves some of the time when asked in its chat template (about a fifth
# of the asserts at first): room to learn in both directions.
MEDIUM = [
    ("count_vowels", "Write a Python function `count_vowels(s)` that returns how many vowels (a, e, i, o, u) the string s contains.",
     "assert count_vowels('hello') == 2\nassert count_vowels('sky') == 0\nassert count_vowels('aeiou') == 5\n"),
    ("fizz", "Write a Python function `fizz(n)` that returns 'Fizz' if n is divisible by 3, else the number n as a string.",
     "assert fizz(3) == 'Fizz'\nassert fizz(4) == '4'\nassert fizz(9) == 'Fizz'\n"),
    ("second_largest", "Write a Python function `second_largest(xs)` that returns the second largest distinct number in the list xs.",
     "assert second_largest([1, 5, 3]) == 3\nassert second_largest([7, 7, 2]) == 2\n"),
    ("is_palindrome", "Write a Python function `is_palindrome(s)` that returns True if the string s reads the same backwards.",
     "assert is_palindrome('level')\nassert not is_palindrome('abc')\n"),
    ("sum_digits", "Write a Python function `sum_digits(n)` that returns the sum of the decimal digits of the non-negative integer n.",
     "assert sum_digits(123) == 6\nassert sum_digits(0) == 0\nassert sum_digits(909) == 18\n"),
    ("factorial", "Write a Python function `factorial(n)` that returns n! for n >= 0.",
     "assert factorial(0) == 1\nassert factorial(5) == 120\n"),
    ("count_words", "Write a Python function `count_words(s)` that returns the number of words in the string s, separated by spaces.",
     "assert count_words('a b c') == 3\nassert count_words('hello') == 1\n"),
    ("only_odd", "Write a Python function `only_odd(xs)` that returns a list of the odd numbers in xs, in order.",
     "assert only_odd([1, 2, 3, 4, 5]) == [1, 3, 5]\nassert only_odd([2]) == []\n"),
]


@pytest.mark.slow
def test_the_reward_rises(tmp_path, smollm2_dir):
    """16 seeded steps on SmolLM2-135M: the mean reward of the last 6 steps beats the first 6 by 0.1.

    Why the margin is safe: measured here with this configuration, the first 6 steps averaged 0.25
    and steps 11-16 0.51 (a 40-step run at 1e-3: 0.20 for the first 10 steps, 0.38 for the last 10).
    One step's mean over 8 answers varies by about 0.2, so a 6-step mean by about 0.08 and the
    difference by about 0.12: 0.1 sits 1.3 of those below the measured 0.26, and the seed fixes
    the samples (a different CPU may round differently, not learn differently)."""
    data = write_jsonl(tmp_path / "medium.jsonl", [{"task_id": t, "prompt": p, "tests": tests} for t, p, tests in MEDIUM])
    trainer = finetune_rl.train(base_model=str(smollm2_dir), data_path=str(data), mbpp_path=str(MBPP),
                                output_dir=str(tmp_path / "rl"), max_steps=16, prompts_per_step=2, num_generations=4,
                                max_completion_length=64, prompt_template="chat", learning_rate=2e-3, save_steps=1000,
                                seed=1, reward="fraction")
    rewards_by_step = [e["rewards/sandbox_fraction/mean"] for e in trainer.state.log_history
                       if "rewards/sandbox_fraction/mean" in e]
    assert len(rewards_by_step) == 16
    first, last = sum(rewards_by_step[:6]) / 6, sum(rewards_by_step[-6:]) / 6
    assert last > first + 0.1, rewards_by_step
