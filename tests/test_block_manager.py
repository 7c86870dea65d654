from hypothesis import given
from hypothesis import strategies as st

from batchdeck.engine.block_manager import BlockManager, blocks_needed


def test_blocks_needed():
    assert blocks_needed(0, 16) == 0
    assert blocks_needed(1, 16) == 1
    assert blocks_needed(16, 16) == 1
    assert blocks_needed(17, 16) == 2


def test_grow_refuses_without_partial_change():
    bm = BlockManager(4, 4)
    assert bm.grow("a", 12)
    assert bm.table("a") and len(bm.table("a")) == 3
    assert not bm.grow("b", 8)  # needs 2, only 1 free
    assert bm.table("b") == [] and bm.num_free == 1
    bm.check()


def test_shrink_and_free_return_blocks():
    bm = BlockManager(8, 4)
    bm.grow("a", 20)
    bm.shrink("a", 5)
    assert len(bm.table("a")) == 2 and bm.num_free == 6
    assert bm.free("a") == 2 and bm.num_free == 8
    bm.check()


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(["grow", "free", "shrink"]),
                          st.integers(0, 40)), max_size=60))
def test_accounting_invariant_holds(ops):
    bm = BlockManager(10, 4)
    for rid, op, n in ops:
        getattr(bm, op)(rid, n) if op != "free" else bm.free(rid)
        bm.check()
        assert bm.num_free + bm.num_used == bm.num_blocks
