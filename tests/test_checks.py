"""The library's one home for argument checks: every check names the argument and the value."""

import math

import pytest

from matta_tf import _checks


@pytest.mark.parametrize(
    ("check", "args", "message"),
    [
        (_checks.check_choice, ("mode", "x", ("a", "b")), r"`mode` must be one of \['a', 'b'\]. Received: mode='x'"),
        (_checks.check_positive_int, ("units", 0), r"`units` must be a positive integer. Received: units=0"),
        (_checks.check_positive_int, ("units", True), r"Received: units=True"),
        (_checks.check_non_negative_int, ("steps", -1), r"`steps` must be a non-negative integer. Received: steps=-1"),
        (_checks.check_non_negative_int, ("steps", 2.0), r"Received: steps=2.0"),
        (_checks.check_int_in_range, ("width", 9, 1, 8), r"`width` must be an integer in \[1, 8\]. Received: width=9"),
        (_checks.check_at_least, ("multiplier", 0.5, 1),
         r"`multiplier` must be a number >= 1. Received: multiplier=0\.5"),
        (_checks.check_at_least, ("multiplier", math.nan, 1), r"Received: multiplier=nan"),
        (_checks.check_in_interval, ("beta", 1.0, 0, 1, False, True),
         r"`beta` must be in \[0, 1\). Received: beta=1.0"),
        (_checks.check_in_interval, ("beta", math.nan, 0, 1), r"Received: beta=nan"),
        (_checks.check_in_interval, ("beta", "0.5", 0, 1), r"Received: beta='0.5'"),
    ],
)
def test_bad_values_are_named(check, args, message):
    with pytest.raises(ValueError, match=message):
        check(*args)


@pytest.mark.parametrize(
    ("check", "args"),
    [
        (_checks.check_choice, ("mode", "a", ("a", "b"))),
        (_checks.check_positive_int, ("units", 1)),
        (_checks.check_non_negative_int, ("steps", 0)),
        (_checks.check_int_in_range, ("width", 8, 1, 8)),
        (_checks.check_at_least, ("multiplier", 1, 1)),
        (_checks.check_in_interval, ("beta", 0.0, 0, 1, False, True)),
        (_checks.check_in_interval, ("beta", 0.5, 0, 1, True, True)),
    ],
)
def test_good_values_pass(check, args):
    check(*args)
