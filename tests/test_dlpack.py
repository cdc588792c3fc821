"""Reader results go to torch / jax through DLPack; nat4etl itself never imports them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import nat4etl
from tests.test_reader import _write_store


@pytest.fixture()
def store(tmp_path):
    _write_store(tmp_path / "nat4")
    with nat4etl.open(tmp_path / "nat4") as s:
        yield s


def _results(store):
    return {
        "spectrograms": store.spectrograms("A1"),
        "spectrograms_val": store.spectrograms("A1", subset="val"),
        "spectrograms_nems": store.spectrograms("A1", norm="nems"),
        "responses": store.responses("A1"),
        "responses_mean": store.responses("A1", trials="mean", norm="deepstrf"),
        "waveforms": store.waveforms("A1"),
    }


def test_torch_from_dlpack_shares_memory(store):
    torch = pytest.importorskip("torch")
    for name, arr in _results(store).items():
        t = torch.from_dlpack(arr)
        assert t.dtype == torch.float32 and tuple(t.shape) == arr.shape, name
        assert t.data_ptr() == arr.__array_interface__["data"][0], name  # no copy
        np.testing.assert_array_equal(t.numpy(), arr)


def test_raw_spectrograms_are_a_view_of_the_arrow_buffer(store):
    arr = store.spectrograms("A1", subset="val")
    assert not arr.flags.owndata  # a view: no copy out of the Parquet column


def test_jax_from_dlpack(store):
    jax = pytest.importorskip("jax")
    for name, arr in _results(store).items():
        j = jax.dlpack.from_dlpack(np.ascontiguousarray(arr))
        np.testing.assert_array_equal(np.asarray(j), arr, err_msg=name)


def test_reading_imports_no_tensor_framework(tmp_path):
    _write_store(tmp_path / "nat4")
    code = (
        "import sys, nat4etl\n"
        f"s = nat4etl.open({str(tmp_path / 'nat4')!r})\n"
        "s.responses('A1'); s.spectrograms('A1', norm='nems'); s.waveforms('A1')\n"
        "print(sorted(m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_jax_takes_the_results_the_reader_fills_without_a_copy(store):
    """jax (CPU) copies a DLPack buffer unless it is 64-byte aligned; the arrays the reader
    fills (normalized, selected, averaged) are, so they go to jax without a copy. (Views of
    the Arrow file are only 8-byte aligned: jax copies those; torch takes every result.)"""
    jax = pytest.importorskip("jax")
    filled = {
        "spectrograms_nems": store.spectrograms("A1", norm="nems"),
        "responses_est": store.responses("A1", subset="est"),
        "responses_norm": store.responses("A1", norm="deepstrf"),
        "responses_mean": store.responses("A1", trials="mean"),
        "responses_cells": store.responses("A1", cells=[3, 1]),
    }
    for name, arr in filled.items():
        j = jax.dlpack.from_dlpack(arr)
        assert j.unsafe_buffer_pointer() == arr.__array_interface__["data"][0], name
        np.testing.assert_array_equal(np.asarray(j), arr, err_msg=name)
