"""engine/staging.py: a step's small arrays reach the device in one copy per dtype."""

import numpy as np
import torch

from tokenmill.engine.block_rows import block_table
from tokenmill.engine.staging import Staging


def test_views_hold_each_array_in_order_and_shape():
    stage = Staging(torch.device("cpu"), torch.int64)
    table = np.arange(6, dtype=np.int32).reshape(2, 3)
    a, b, c, empty = stage([1, 2, 3], table, np.array([7]), [])
    assert a.tolist() == [1, 2, 3]
    assert b.shape == (2, 3) and b.dtype == torch.int64 and b.tolist() == table.tolist()
    assert c.tolist() == [7] and empty.numel() == 0


def test_buffers_rotate_and_grow():
    stage = Staging(torch.device("cpu"), torch.float32, depth=2)
    (first,) = stage([0.5, 1.5])
    (second,) = stage([2.5])
    assert first.tolist() == [0.5, 1.5] and second.tolist() == [2.5]  # two buffers: both intact
    (third,) = stage([9.0])
    assert third.tolist() == [9.0] and first[0].item() == 9.0  # `depth` calls later: reused
    big = list(range(10_000))
    (grown,) = stage(big)
    assert grown.tolist() == [float(x) for x in big]


def test_block_table_pads_rows_and_hides_freed_blocks():
    table = block_table([[3, 1, 4], [], [-1, -1, 5, 9, 2]])
    assert table.dtype == np.int32
    assert table.tolist() == [[3, 1, 4, 0, 0], [0, 0, 0, 0, 0], [0, 0, 5, 9, 2]]
    assert block_table([]).shape == (0, 1)


def test_every_view_starts_64_byte_aligned():
    """Triton specializes on 16-byte pointer alignment: odd offsets would compile variants."""
    for dtype in (torch.int32, torch.int64, torch.float32):
        stage = Staging(torch.device("cpu"), dtype)
        views = stage([1, 2, 3], [4], list(range(17)), [], [5, 6])
        base = views[0].data_ptr()
        assert all((v.data_ptr() - base) % 64 == 0 for v in views)
        assert [v.tolist() for v in views] == [[1, 2, 3], [4], list(range(17)), [], [5, 6]]
