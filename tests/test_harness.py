"""The test harness itself: conftest's shared compilation cache."""

import threading

from jax._src import lru_cache


def test_cache_entries_are_never_read_half_written(tmp_path):
    """Workers share one unlocked cache: a reader polling while another process writes must see no entry or the
    whole one (in-place writes showed a reader a prefix)."""
    cache = lru_cache.LRUCache(str(tmp_path), max_size=-1)
    assert getattr(lru_cache.LRUCache.put, "atomic", False), "conftest's atomic writes are not installed"
    value = bytes(range(256)) * (1 << 16)  # 16 MiB: its write takes long enough to be caught midway
    seen = []
    for key in ("a", "b", "c"):
        writer = threading.Thread(target=cache.put, args=(key, value))
        writer.start()
        while (got := cache.get(key)) is None:  # poll from before the file exists until an entry is there
            pass
        seen.append(len(got))
        writer.join()
    assert seen == [len(value)] * 3, f"a reader saw entries of {seen} bytes, of {len(value)}"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
