"""The group committer: while callers never overlap each writes on its own thread; callers
that arrive while someone writes share the writer thread's next commit, and from then on all
go through it; a failure stays with its own item."""

from __future__ import annotations

import threading
import time
from functools import partial

import pytest
from fakes import deadlock
from sqlalchemy import create_engine, text

from txsms.core import storage
from txsms.core.groupcommit import GroupCommitter


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'gc.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (v INTEGER UNIQUE)"))
    yield engine
    engine.dispose()


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


class Recorder:
    """A run_group that inserts each item's value and says which thread ran which group;
    `notes`: the values whose commit went through (`after_commit`)."""

    def __init__(self):
        self.groups: list[tuple[int, list[int]]] = []
        self.notes: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()

    def __call__(self, conn, items: list[int]) -> list[int]:
        if not self.hold.is_set():
            self.holding.set()
            self.hold.wait(5)
        self.groups.append((threading.get_ident(), list(items)))
        for v in items:
            storage.after_commit(conn, partial(self.notes.append, v))
            conn.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": v})
        return [v * 10 for v in items]


def stored(engine) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(text("SELECT v FROM t")).scalars())


def test_a_caller_alone_writes_on_its_own_thread(engine):
    record = Recorder()
    committer = GroupCommitter(engine, record)
    try:
        assert committer.run(1) == 10
        assert committer.run(2) == 20
        assert record.groups == [(threading.get_ident(), [1]), (threading.get_ident(), [2])]
        assert committer._thread is None  # no writer thread was needed
        assert stored(engine) == [1, 2]  # committed, seen from another connection
    finally:
        committer.close()
    assert committer._conn is None  # the held connection is released


def test_callers_arriving_while_one_writes_share_the_next_commit(engine):
    record = Recorder()
    committer = GroupCommitter(engine, record)
    record.hold.clear()
    results: dict[int, int] = {}
    handed: list[int] = []
    submit = committer.submit

    def counting_submit(item):
        future = submit(item)
        handed.append(item)
        return future

    committer.submit = counting_submit

    def call(v: int) -> None:
        results[v] = committer.run(v)

    leader = threading.Thread(target=call, args=(1,))
    leader.start()
    assert record.holding.wait(5)  # the leader is inside its transaction
    followers = [threading.Thread(target=call, args=(v,)) for v in (2, 3, 4)]
    for t in followers:
        t.start()
    wait_until(lambda: len(handed) == 3)  # all handed to the writer thread
    record.hold.set()
    for t in [leader, *followers]:
        t.join(5)
    assert results == {1: 10, 2: 20, 3: 30, 4: 40}
    assert [items for _, items in record.groups] == [[1], [2, 3, 4]]
    assert record.groups[0][0] == leader.ident  # the leader wrote its own
    assert record.groups[1][0] == committer._thread.ident  # the rest, together
    # Callers overlapped once: a lone caller now goes through the writer thread too.
    assert committer.run(5) == 50
    assert record.groups[2] == (committer._thread.ident, [5])
    committer.close()
    assert stored(engine) == [1, 2, 3, 4, 5]


def test_a_failing_item_fails_alone_and_the_connection_is_replaced(engine):
    """A bad item fails alone; what `after_commit` was given goes out once its item is
    committed: not for the group that failed, then again for the item run alone."""
    record = Recorder()
    committer = GroupCommitter(engine, record)
    try:
        assert committer.run(1) == 10 and record.notes == [1]
        first = committer._conn
        with pytest.raises(Exception, match="UNIQUE"):
            committer.run(1)  # tried again on a fresh connection: still a duplicate
        assert record.notes == [1]
        assert committer._conn is None
        assert committer.run(2) == 20
        assert committer._conn is not first
        # Through the writer thread: a bad item in a group leaves the others committed.
        futures = [committer.submit(v) for v in (3, 2, 4)]
        assert futures[0].result(5) == 30 and futures[2].result(5) == 40
        with pytest.raises(Exception, match="UNIQUE"):
            futures[1].result(5)
    finally:
        committer.close()
    assert sorted(record.notes) == [1, 2, 3, 4]
    assert stored(engine) == [1, 2, 3, 4]


def test_the_writer_thread_and_callers_never_write_at_once(engine):
    """Many threads at once: every item committed exactly once, and no two groups overlap
    (they share one connection)."""
    active, overlaps = [0], []
    lock = threading.Lock()

    def run_group(conn, items):
        with lock:
            active[0] += 1
            overlaps.append(active[0])
        try:
            for v in items:
                conn.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": v})
            return items
        finally:
            with lock:
                active[0] -= 1

    committer = GroupCommitter(engine, run_group)
    threads = [
        threading.Thread(target=lambda n=n: [committer.run(n * 100 + i) for i in range(25)])
        for n in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    committer.close()
    assert max(overlaps) == 1
    assert stored(engine) == sorted(n * 100 + i for n in range(8) for i in range(25))


def test_an_item_aborted_for_another_transactions_sake_runs_again(engine):
    """A group, then the item alone, aborted by the database as a deadlock victim: the item
    runs again and commits once."""
    record, aborts = Recorder(), [2]

    def deadlocking(conn, items: list[int]) -> list[int]:
        results = record(conn, items)
        if aborts[0]:
            aborts[0] -= 1
            raise deadlock()
        return results

    committer = GroupCommitter(engine, deadlocking)
    try:
        assert committer.submit(7).result(5) == 70
    finally:
        committer.close()
    assert aborts == [0]
    assert stored(engine) == [7]
