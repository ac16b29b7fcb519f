"""Answer verifiers: hand-written rationales per built-in, the registry, and the self-consistency vote."""

from __future__ import annotations

import pytest

from kdlm.errors import ConfigError
from kdlm.generation import verifiers
from kdlm.generation.verifiers import VERIFIERS, Verifier, get_verifier, last_boxed, majority_vote, register_verifier

# A real GSM8K training row (the first one), reference and a teacher rationale in its style
GSM8K_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
GSM8K_REFERENCE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"


def test_builtins_are_registered():
    assert {"gsm8k", "boxed", "exact", "regex", "choice"} <= set(VERIFIERS)


# ----------------------------------------------------------------------------- gsm8k


def test_gsm8k_gold_is_the_number_after_hashes():
    v = get_verifier("gsm8k")
    assert v.gold(GSM8K_REFERENCE) == "72"
    assert v.gold("Step one costs $1,000.\n#### 1,000") == "1000"
    assert v.gold("12.50") == "12.5"  # a bare number is its own gold
    assert v.gold("no answer here") is None


@pytest.mark.parametrize(
    "rationale",
    [
        GSM8K_REFERENCE,  # the reference itself verifies
        "In May she sold 48 / 2 = 24 clips. In total 48 + 24 = 72.\n#### 72",
        "She sold 24 in May, so 48 + 24 = 72 in all. The answer is 72.",
        "48 + 24 = 72, so the total is $\\boxed{72}$.",
        "April 48, May 24: altogether 72",
        "The answer is: **72.00** clips",
    ],
)
def test_gsm8k_accepts_correct_rationales(rationale):
    assert get_verifier("gsm8k").verify(rationale, GSM8K_REFERENCE)


@pytest.mark.parametrize(
    "rationale",
    [
        "In May she sold 48 * 2 = 96 clips, so 48 + 96 = 144.\n#### 144",
        "She sold 72 clips? No: #### 24",  # the #### line wins over earlier numbers
        "I cannot tell how many clips she sold.",
        "",
    ],
)
def test_gsm8k_rejects_wrong_or_missing_answers(rationale):
    assert not get_verifier("gsm8k").verify(rationale, GSM8K_REFERENCE)


def test_gsm8k_prediction_is_extract_number():
    from kdlm.evaluation.answers import extract_number

    text = "It costs $1,250.50 in total.\n#### 1,250.50"
    assert get_verifier("gsm8k").extract(text) == extract_number(text) == "1250.5"


# ----------------------------------------------------------------------------- boxed


def test_last_boxed_handles_nested_and_unclosed_boxes():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed{ {a}{b} }") == " {a}{b} "
    assert last_boxed(r"\boxed{3} and a truncated \boxed{\frac{1}{") == "3"  # the unclosed one is no answer
    assert last_boxed("no box") is None


def test_boxed_extract_and_gold():
    v = get_verifier("boxed")
    assert v.extract(r"Thus $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert v.extract(r"\boxed{1,000.0}") == "1000"  # numbers normalised
    assert v.extract(r"\boxed{ x  +   1 }") == "x + 1"  # whitespace collapsed
    assert v.extract(r"\boxed{}") is None
    assert v.extract("The answer is 4") is None  # no box, no answer
    assert v.gold(r"The area is $\boxed{16\pi}$.") == r"16\pi"
    assert v.gold("  16\\pi ") == r"16\pi"  # no box: the reference itself
    assert v.gold("7.0") == "7"


def test_boxed_match():
    v = get_verifier("boxed")
    assert v.verify(r"... so the answer is $\boxed{\dfrac{3}{4}}$", r"\boxed{\dfrac{3}{4}}")
    assert v.verify(r"\boxed{12}", "12.00")
    assert not v.verify(r"\boxed{\frac{3}{5}}", r"\frac{3}{4}")
    assert not v.verify("the answer is 12", "12")


# ----------------------------------------------------------------------------- exact


def test_exact_reads_after_the_last_answer_mark():
    v = get_verifier("exact")
    assert v.extract("France's capital... The answer is **Paris**.") == "paris"
    assert v.extract("Answer: New   York City\nI hope that helps.") == "new york city"
    assert v.extract("The answer is wrong. Final answer: Rome") == "rome"  # the last mark
    assert v.extract("  Paris ") == "paris"  # no mark: the whole text
    assert v.verify("The answer is Paris.", "paris")
    assert not v.verify("The answer is Lyon.", "Paris")
    assert not v.verify("The answer is", "Paris")


def test_exact_case_sensitive_option():
    v = get_verifier("exact", case_sensitive=True)
    assert v.verify("Answer: pH", "pH")
    assert not v.verify("Answer: PH", "pH")
    with pytest.raises(ConfigError, match="case_sensitive"):
        get_verifier("exact", case_sensitive="yes")


# ----------------------------------------------------------------------------- regex


def test_regex_uses_the_last_match_group_one():
    v = get_verifier("regex", pattern=r"(?i)final answer:\s*(\S+)")
    assert v.extract("Final answer: 3\n...wait.\nFinal answer: 1,000") == "1000"
    assert v.gold(" 1000 ") == "1000"
    assert v.verify("final answer: blue", "blue")
    assert v.extract("no match here") is None


def test_regex_without_group_uses_the_whole_match():
    v = get_verifier("regex", pattern=r"[A-Z]{3}-\d+")
    assert v.extract("tickets ABC-1 and XYZ-42") == "XYZ-42"


@pytest.mark.parametrize("options", [{}, {"pattern": ""}, {"pattern": "(unclosed"}])
def test_regex_needs_a_valid_pattern(options):
    with pytest.raises(ConfigError, match=r"^generate\.verifier_options\.pattern: "):
        get_verifier("regex", **options)


# ----------------------------------------------------------------------------- choice


@pytest.mark.parametrize(
    "text, letter",
    [
        ("Comparing the options, the answer is (B).", "B"),
        ("Answer: C", "C"),
        ("Answer: **d**", "D"),
        ("Option A is wrong. So **E** is right.", "E"),
        ("It must be the second one (b)", "B"),
        ("Eliminating the rest leaves\nD.\n", "D"),
        ("The answer is (A), not (C)... on reflection the answer is C", "C"),
    ],
)
def test_choice_extracts_letters(text, letter):
    assert get_verifier("choice").extract(text) == letter


@pytest.mark.parametrize("text", ["the answer is a dog", "I am not sure.", "Answer: F", ""])
def test_choice_finds_no_letter(text):
    assert get_verifier("choice").extract(text) is None


def test_choice_gold_letter_or_index():
    v = get_verifier("choice")
    assert [v.gold(g) for g in ("B", " c ", "(D)", "0", 4, "The answer is (A)")] == ["B", "C", "D", "A", "E", "A"]
    assert v.gold(7) is None and v.gold(True) is None
    assert v.verify("so the answer is (c)", 2)


def test_choice_letters_option():
    v = get_verifier("choice", letters="ABCD")
    assert v.extract("Answer: E") is None
    assert v.extract("Answer: D") == "D"
    with pytest.raises(ConfigError, match="letters"):
        get_verifier("choice", letters="AAB")


# ----------------------------------------------------------------------------- registry


def test_unknown_verifier_names_the_nearest():
    with pytest.raises(ConfigError, match=r"^generate\.verifier: .*'gsm8kk'.*did you mean 'gsm8k'"):
        get_verifier("gsm8kk")


def test_unknown_option_names_the_nearest():
    with pytest.raises(ConfigError, match=r"generate\.verifier_options\.patern: .*did you mean 'pattern'"):
        get_verifier("regex", patern="x")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_verifier("gsm8k")(verifiers.Gsm8kVerifier)


def test_user_verifier_by_name(monkeypatch):
    monkeypatch.setattr(verifiers, "_REGISTRY", dict(verifiers._REGISTRY))  # keep the real registry clean

    @register_verifier("last_word")
    class LastWord(Verifier):
        def __init__(self, *, lower: bool = True) -> None:
            self.lower = lower

        def extract(self, text):
            words = text.split()
            return (words[-1].strip(".").lower() if self.lower else words[-1]) if words else None

    v = get_verifier("last_word")
    assert v.verify("It is blue.", "Blue") and not v.verify("", "blue")
    assert get_verifier("last_word", lower=False).extract("It is Blue") == "Blue"


def test_base_match_never_matches_missing_answers():
    v = get_verifier("exact")
    assert not v.match(None, None)
    assert not v.match("a", None)
    assert v.match("a", "a")


# ----------------------------------------------------------------------------- majority vote


def test_majority_vote_share_counts_all_samples():
    assert majority_vote(["72", "72", None, "24"]) == ("72", 0.5)
    assert majority_vote(["3"]) == ("3", 1.0)


def test_majority_vote_tie_goes_to_first_seen():
    assert majority_vote(["24", "72", "72", "24"]) == ("24", 0.5)
    assert majority_vote([None, "b", "a"]) == ("b", pytest.approx(1 / 3))


def test_majority_vote_without_answers():
    assert majority_vote([None, None]) == (None, 0.0)
    assert majority_vote([]) == (None, 0.0)
