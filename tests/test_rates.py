"""RateMeter: tokens per second from monotonic counters, following the machine."""

import pytest

from disagg.scheduler.rates import RateMeter


def test_first_poll_is_a_baseline_then_each_poll_a_sample():
    m = RateMeter(weight=0.5)
    m.observe(1000, 2.0)  # whatever ran before the gateway started watching
    assert m.rate is None
    m.observe(3000, 3.0)  # 2000 tokens in 1 s
    assert m.rate == pytest.approx(2000)
    m.observe(4000, 4.0)  # then 1000 tokens/s: the mean moves half way
    assert m.rate == pytest.approx(1500)


def test_idle_polls_and_tiny_steps_are_no_samples_but_add_up():
    m = RateMeter(weight=1.0, min_seconds=0.1)
    m.observe(0, 0.0)
    m.observe(0, 0.0)  # idle
    m.observe(50, 0.05)  # too little work to trust
    assert m.rate is None
    m.observe(200, 0.2)  # together with the step before: 200 tokens in 0.2 s
    assert m.rate == pytest.approx(1000)


def test_a_restarted_engine_restarts_the_counters_not_the_rate():
    m = RateMeter(weight=1.0)
    m.observe(0, 0.0)
    m.observe(4000, 2.0)
    m.observe(100, 0.1)  # counters went back: a new engine process
    assert m.rate == pytest.approx(2000)
    m.observe(1100, 1.1)
    assert m.rate == pytest.approx(1000)


def test_a_window_the_caller_rejects_is_skipped_not_sampled():
    m = RateMeter(weight=1.0)
    m.observe(0, 0.0)
    m.observe(10, 5.0, sample=False)  # e.g. KV pulled, not computed: 10 tokens "in" 5 s
    assert m.rate is None
    m.observe(2010, 6.0)
    assert m.rate == pytest.approx(2000)
