"""NAT4 conventions: file names, sound classes, unit ids and the key that matches them."""

from __future__ import annotations

import pytest

from nat4etl import nat4


def test_area_files_are_the_zenodo_names():
    f = nat4.area_files("PEG")
    assert f.population == "PEG_NAT4_ozgf.fs100.ch18.tgz"
    assert f.single_sites == "PEG_single_sites.zip"
    assert f.pred_correlation == "PEG_pred_correlation.csv"


@pytest.mark.parametrize(
    ("name", "subset"),
    [
        ("STIM_cat1_rec1_x.wav", "est"),
        ("STIM_00cat172_rec1_geese_excerpt1.wav", "val"),
        ("STIM_00cat668_rec3_ferret_kits_51p9-8-10-11-12-13-14_excerpt1.wav", "val"),
        ("STIM_Cat1.wav", "other"),
        ("STIM_0cat1.wav", "other"),
        ("STIM_x.wav", "other"),
    ],
)
def test_stim_subset(name, subset):
    assert nat4.stim_subset(name) == subset


def test_wav_name_drops_only_the_prefix():
    assert nat4.wav_name("STIM_00cat1_rec1_STIM_a.wav") == "00cat1_rec1_STIM_a.wav"
    assert nat4.wav_name("cat1.wav") == "cat1.wav"


def test_is_stim():
    assert nat4.is_stim("STIM_x")
    assert not nat4.is_stim("REFERENCE")
    assert not nat4.is_stim(None)


def test_parse_unit_id():
    u = nat4.parse_unit_id("ARM029a-01-1")
    assert (u.site, u.animal, u.electrode, u.unit) == ("ARM029a", "ARM", 1, 1)
    assert nat4.parse_unit_id("DRX006b-95-2").key == ("DRX006b", 95, 2)
    assert nat4.parse_unit_id("TNC015a") is None
    assert nat4.parse_unit_id("TNC015a-x-1") is None
    assert nat4.parse_unit_id(None) is None


def test_canonical_key_matches_zero_padded_tnc_ids():
    assert nat4.canonical_unit_key("TNC015a-012-1") == nat4.canonical_unit_key("TNC015a-12-1")
    assert nat4.canonical_unit_key("TNC015a-012-1") != nat4.canonical_unit_key("TNC015a-12-2")
    assert nat4.canonical_unit_key("TNC015a-12-1") != nat4.canonical_unit_key("TNC015b-12-1")


def test_site_of_unit_survives_odd_tails():
    assert nat4.site_of_unit("ARM029a-01-1") == "ARM029a"
    assert nat4.site_of_unit("ARM029a-x") == "ARM029a"
    assert nat4.site_of_unit("garbage") is None


def test_site_from_names():
    assert nat4.site_from_recording_name("TNC015a") == "TNC015a"
    assert nat4.site_from_recording_name("TNC015a_a_NAT") == "TNC015a"
    assert nat4.site_from_recording_name("NAT4_ozgf") is None
    assert nat4.site_from_file_name("A1_single_sites/A1_TNC015a_abf3.tgz") == "TNC015a"
    assert nat4.site_from_file_name("A1_TNC015a.tgz") is None
