"""Replacement of unreadable examples and the bad-fraction limit (rwkvunet_jax.data.bad_examples)."""

from __future__ import annotations

import numpy as np
import pytest

from rwkvunet_jax.data import bad_examples as bx


class Source:
    """Examples {"x": i}; the indices in ``broken`` raise OSError (or ``error``)."""

    def __init__(self, n, broken=(), error=OSError):
        self.n, self.broken, self.error = n, set(broken), error

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.broken:
            raise self.error(f"cannot decode {i}")
        return {"x": i}

    def describe(self, i):
        return f"file_{i}.jpg"


def test_replacement_depends_on_the_index_and_attempt_only_and_stays_in_range():
    for n in (2, 3, 12, 1000, 1281167):
        for index in (0, 1, n - 1):
            for attempt in (1, 2, 3):
                other = bx.replacement_index(index, attempt, n)
                assert 0 <= other < n and other != index
                assert other == bx.replacement_index(index, attempt, n)


def test_read_and_transform_serves_a_replacement_flagged_with_the_failing_index(caplog):
    source = Source(50, broken={7})
    fn = bx.ReadAndTransform(source, lambda ex, rng: {"x": ex["x"] * 10})
    good = fn(3, np.random.default_rng(0))
    assert good == {"x": 30, "bad_index": -1}
    out = fn(7, np.random.default_rng(0))
    assert out["bad_index"] == 7 and out["x"] == 10 * bx.replacement_index(7, 1, 50)
    assert "bad example 7 (file_7.jpg: OSError: cannot decode 7)" in caplog.text


def test_transform_errors_are_replaced_too():
    def transform(ex, rng):
        if ex["x"] == 4:
            raise ValueError("bits must be between or equal to 1 and 8")
        return dict(ex)

    out = bx.ReadAndTransform(Source(9), transform)(4, np.random.default_rng(0))
    assert out["bad_index"] == 4 and out["x"] != 4


def test_unreadable_data_stops_with_one_clear_error():
    fn = bx.ReadAndTransform(Source(40, broken=range(40)))
    with pytest.raises(bx.BadDataError, match=r"16 examples in a row .* file_5.jpg: OSError: cannot decode 5"):
        fn(5, np.random.default_rng(0))


def test_keyboard_interrupt_is_not_swallowed():
    with pytest.raises(KeyboardInterrupt):
        bx.ReadAndTransform(Source(5, broken={2}, error=KeyboardInterrupt))(2, np.random.default_rng(0))


def test_counter_tolerates_bad_examples_below_the_limit_and_stops_above_it():
    counter = bx.BadExampleCounter(0.05, min_examples=100, name=lambda i: f"file_{i}.jpg")
    flags = np.full(10, -1)
    flags[2] = 17
    for _ in range(5):  # 10% bad but fewer than min_examples drawn: no verdict yet
        assert counter.update({"bad_index": flags, "label": np.zeros(10)}) == 1
    assert counter.bad == 5 and counter.seen == 50 and counter.examples == [17]
    counter.update({"label": np.zeros(40)})  # a batch without flags counts as clean
    assert counter.seen == 90
    with pytest.raises(bx.BadDataError) as err:
        flags2 = flags.copy()
        flags2[5] = 23
        counter.update({"bad_index": flags2, "label": np.zeros(10)})
    message = str(err.value)
    assert "7 of 100 training examples (7.00%)" in message and "max_bad_fraction=0.05" in message
    assert "file_17.jpg, file_23.jpg" in message and "\n" not in message


def test_counter_limit_off_at_one_and_totals_over_processes():
    counter = bx.BadExampleCounter(1.0, min_examples=1)
    counter.update({"bad_index": np.arange(10)})
    assert counter.bad == counter.seen == 10
    limited = bx.BadExampleCounter(0.1, min_examples=100)
    limited.update({"bad_index": np.array([1, -1, -1, -1])}, check=False)
    limited.check(seen=1000, bad=100)  # totals summed over processes: at the limit, not over it
    with pytest.raises(bx.BadFractionError, match="101 of 1000"):
        limited.check(seen=1000, bad=101)
