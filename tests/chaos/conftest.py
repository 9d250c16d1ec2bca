"""Two real iris-fast nodes replicating to each other through fault-injecting proxies."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import ServerProcess

from chaos.faultproxy import FaultProxy
from iris_fast.ports import free_port


class Pair:
    """Nodes ``a`` and ``b``; a's records reach b through ``ab``, b's reach a through ``ba``."""

    def __init__(self, make, workers: int, extra: tuple[str, ...]) -> None:
        self.repl_a, self.repl_b = free_port(), free_port()
        self.ab = FaultProxy(free_port(), ("127.0.0.1", self.repl_b)).start()
        self.ba = FaultProxy(free_port(), ("127.0.0.1", self.repl_a)).start()
        common = ("--workers", str(workers), "--heartbeat", "0.25", "--peer-timeout", "1.0")
        self.a: ServerProcess = make(
            "--repl-port", str(self.repl_a), "--peer", f"127.0.0.1:{self.ab.listen_port}",
            *common, *extra, node_id="a", start=False,
        )  # fmt: skip
        self.b: ServerProcess = make(
            "--repl-port", str(self.repl_b), "--peer", f"127.0.0.1:{self.ba.listen_port}",
            *common, *extra, node_id="b", start=False,
        )  # fmt: skip

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [self.a.addr, self.b.addr]

    def start(self) -> Pair:
        self.a.start(accept=("ok", "degraded"))
        self.b.start()
        self.wait_paired()
        return self

    def wait_paired(self, timeout: float = 30.0) -> None:
        """Until both nodes say ``ok``: peer up, caught up, not degraded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(n.health()["status"] == "ok" for n in (self.a, self.b)):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(
            f"pair not healthy: a={self._health(self.a)} b={self._health(self.b)}\n"
            f"--- a ---\n{self.a.log()}\n--- b ---\n{self.b.log()}"
        )

    @staticmethod
    def _health(n: ServerProcess) -> object:
        try:
            return n.health()
        except OSError as exc:
            return exc

    def partition(self) -> None:
        self.ab.blackhole()
        self.ba.blackhole()

    def heal(self) -> None:
        self.ab.heal()
        self.ba.heal()

    def close(self) -> None:
        self.ab.close()
        self.ba.close()


@pytest.fixture
def pair_factory(server_factory) -> Iterator:
    pairs: list[Pair] = []

    def make(workers: int = 2, *extra: str, start: bool = True) -> Pair:
        p = Pair(server_factory, workers, extra)
        pairs.append(p)
        return p.start() if start else p

    yield make
    for p in pairs:
        p.close()


@pytest.fixture
def pair(pair_factory) -> Pair:
    return pair_factory()
