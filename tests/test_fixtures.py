"""The platform fixtures are kept in the repository so a fresh clone tests on its own; they are
byte-for-byte copies of the project's shared fixtures (../shared/fixtures), never edited."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def test_the_fixtures_are_here():
    names = {p.relative_to(HERE).as_posix() for p in HERE.rglob("*") if p.is_file()}
    assert "shopify/orders_create.json" in names
    assert "woocommerce/signature-vectors.json" in names


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/fixtures is not beside this clone")
def test_they_are_exact_copies_of_the_shared_fixtures():
    shared = {p.relative_to(SHARED).as_posix(): p for p in SHARED.rglob("*") if p.is_file()}
    here = {p.relative_to(HERE).as_posix(): p for p in HERE.rglob("*") if p.is_file()}
    assert here.keys() == shared.keys()
    for name, path in shared.items():
        assert here[name].read_bytes() == path.read_bytes(), name
