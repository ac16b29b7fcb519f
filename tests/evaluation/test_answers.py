"""GSM8K answer extraction and number normalisation."""

from __future__ import annotations

import pytest

from kdlm.evaluation.answers import extract, extract_number, normalize_number


@pytest.mark.parametrize("text, number", [
    ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
    ("So he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000", "70000"),
    ("#### 1,234", "1234"),                                   # thousands separators
    ("The answer is 1,000,000.", "1000000"),
    ("The answer is $18.00", "18"),                           # $ and trailing .00
    ("The answer is 18.0.", "18"),                            # trailing .0 and full stop
    ("The answer is: **42**", "42"),                          # markdown bold
    ("the answer is -7 degrees", "-7"),                       # negatives
    ("Answer: -12.50", "-12.5"),                              # negative decimal
    ("It costs 3.75 per kilo, so 7.5 in total", "7.5"),       # last number, decimals
    ("half of it, which is .5", "0.5"),
    ("First 3 then 5 so the answer is 12. Check: 12 - 5 = 7", "12"),  # "answer is" beats the last number
    ("#### 5\nThe answer is 6", "5"),                         # #### beats "answer is"
    (r"so the result is \boxed{14}.", "14"),
    ("from 3-5 people", "5"),                                 # a range's dash is not a minus sign
    ("The temperature fell to \u22124", "-4"),               # unicode minus
    ("no digits here", None),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize("raw, norm", [
    ("$1,000.50", "1000.5"), ("18.0", "18"), ("0.50", "0.5"), ("-3", "-3"), ("7.", "7"), ("1e3", "1000"),
    ("abc", None), ("", None), ("nan", None),
])
def test_normalize_number(raw, norm):
    assert normalize_number(raw) == norm


def test_extract_none_keeps_the_text():
    assert extract("none", "  Paris \n") == "Paris"
    assert extract("number", "I think 4") == "4"
