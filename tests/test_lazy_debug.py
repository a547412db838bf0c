"""py-libp2p's eager ``logger.debug(f"...")`` calls made lazy (swarmnode.p2p.lazy_debug), checked on
a module written for the test and on the real yamux module over a real Noise/Yamux connection."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import pytest
import trio

from swarmnode.p2p import lazy_debug

MODULE = """
import logging

logger = logging.getLogger("lazy_debug_probe")
built = []


def describe(x):
    built.append(x)
    return f"x={x}"


def work(x):
    logger.debug(f"working on {describe(x)}")
    return x * 2


def via_the_module(x):
    logging.debug("the logging module's own debug(): left as it is")  # it has no isEnabledFor
    return x + 1


class Box:
    def __init__(self, x):
        self.x = x

    @property
    def doubled(self):
        logger.debug("doubling %s", describe(self.x))
        return work(self.x)

    def closure(self):
        def inner(y):
            logger.debug(f"inner {describe(y)}")
            return y + self.x

        return inner
"""


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "lazy_debug_probe.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("lazy_debug_probe", None)
    module = importlib.import_module("lazy_debug_probe")
    yield module
    sys.modules.pop("lazy_debug_probe", None)


def test_debug_arguments_are_built_only_when_debug_is_on_and_results_do_not_change(
    probe, caplog: pytest.LogCaptureFixture
) -> None:
    bound_before = probe.Box(3).closure  # a reference taken before the swap runs the new code too
    caplog.set_level(logging.INFO, logger="lazy_debug_probe")
    assert probe.work(5) == 10 and probe.built == [5]  # eager: built although DEBUG is off

    assert lazy_debug.guard_debug_logs(probe) == 3  # work, the property getter, closure (inner is nested)
    probe.built.clear()
    assert probe.work(5) == 10 and probe.Box(4).doubled == 8 and bound_before()(1) == 4
    assert probe.via_the_module(1) == 2
    assert probe.built == [] and caplog.records == []

    caplog.set_level(logging.DEBUG, logger="lazy_debug_probe")
    assert probe.work(6) == 12 and bound_before()(2) == 5
    assert [r.getMessage() for r in caplog.records] == ["working on x=6", "inner x=2"]
    assert probe.built == [6, 2]


def test_the_hot_library_modules_are_guarded_once_and_a_real_connection_still_carries_every_byte() -> None:
    from tests.test_p2p_costs import send_and_receive

    changed = lazy_debug.guard_hot_debug_logs()
    assert set(changed) == set(lazy_debug.HOT_MODULES)
    assert changed["libp2p.stream_muxer.yamux.yamux"] >= 10  # its frame loop, reads and writes log eagerly
    assert lazy_debug.guard_hot_debug_logs() == changed  # once per process
    yamux = importlib.import_module("libp2p.stream_muxer.yamux.yamux")
    assert lazy_debug.guard_debug_logs(yamux) == 0  # already lazy: nothing left to change
    sizes = [8192] * 20 + [300_000]
    assert trio.run(send_and_receive, sizes) == sizes
