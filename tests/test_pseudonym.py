"""Patient pseudonyms: stable numbering from a salted hash, sample ids and free text rewritten, files round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from vesselnb import pseudonym
from vesselnb.data import parse_sample_name
from vesselnb.demo.synth import patient_name
from vesselnb.errors import DataError

USERS_STYLE = [
    "Chen_Fang_0000103366__1-4_1_04B2D3CF_frame_000034",
    "Chen_Fang_0000103366__1-4_1_04B2D3CF_frame_000035",
    "Chen_Fang_0000103366__2-1_1_9A00C1D2_frame_000002",
    "Li_Wei_0000200001__1-1_1_11111111_frame_000010",
    "Zhang_San_0000300777__3-2_1_ABCDEF01_frame_000001",
]


def _patients(ids: list[str]) -> list[str]:
    return pseudonym.patients_in(ids)


def test_patients_in_follows_the_naming_rule() -> None:
    assert _patients(USERS_STYLE) == ["Chen_Fang_0000103366", "Li_Wei_0000200001", "Zhang_San_0000300777"]
    assert _patients(USERS_STYLE) == list(dict.fromkeys(parse_sample_name(s)[0] for s in USERS_STYLE))


def test_numbering_is_dense_and_follows_the_salted_hash_not_the_name() -> None:
    patients = [f"Patient_{i:02d}_{1000 + i}" for i in range(30)]
    salt = pseudonym.new_salt()
    mapping = pseudonym.assign(patients, salt)
    assert sorted(mapping.values()) == [f"P{n:02d}" for n in range(1, 31)]
    by_hash = sorted(patients, key=lambda p: pseudonym.salted_rank_key(p, salt))
    assert [mapping[p] for p in by_hash] == [f"P{n:02d}" for n in range(1, 31)]
    # the order of the input and repetitions do not matter; another salt gives another order
    assert pseudonym.assign(list(reversed(patients)) + patients[:3], salt) == mapping
    orders = {tuple(sorted(patients, key=pseudonym.assign(patients, pseudonym.new_salt()).get)) for _ in range(5)}
    assert len(orders) > 1


def test_new_patients_get_the_next_numbers_without_renumbering() -> None:
    salt = pseudonym.new_salt()
    first = pseudonym.assign(["A_1001", "B_1002", "C_1003"], salt)
    grown = pseudonym.assign(["D_1004", "A_1001", "E_1005"], salt, existing=first)
    assert {p: grown[p] for p in first} == first
    assert sorted(grown[p] for p in ("D_1004", "E_1005")) == ["P04", "P05"]


def test_more_than_99_patients_keep_two_digit_ids_for_the_first_hundred() -> None:
    mapping = pseudonym.assign([f"X_{i:04d}" for i in range(120)], pseudonym.new_salt())
    assert {"P01", "P99", "P100", "P120"} <= set(mapping.values())
    assert len(set(mapping.values())) == 120


def test_sample_id_keeps_sequence_and_frame() -> None:
    names = pseudonym.Pseudonyms(pseudonym.assign(_patients(USERS_STYLE), pseudonym.new_salt()))
    chen = names.patient("Chen_Fang_0000103366")
    assert names.sample_id(USERS_STYLE[0]) == f"{chen}__1-4_1_04B2D3CF_frame_000034"
    mapped = [names.sample_id(s) for s in USERS_STYLE]
    assert len(set(mapped)) == len(USERS_STYLE), "rows must stay distinguishable"
    for original, new in zip(USERS_STYLE, mapped, strict=True):
        assert names.leaks(new) == []
        assert parse_sample_name(new, r"^(?P<patient>P\d+)__(?P<sequence>.+)_frame_(?P<frame>\d+)$")[1:] == \
            parse_sample_name(original)[1:]


def test_sample_id_with_a_custom_regex_and_an_unmatched_name() -> None:
    regex = r"^(?P<sequence>seq\d+)-(?P<patient>[a-z]+)-(?P<frame>\d+)$"
    ids = ["seq1-alice-003", "seq2-bob-001", "odd_file"]
    names = pseudonym.Pseudonyms(pseudonym.assign(pseudonym.patients_in(ids, regex), pseudonym.new_salt()))
    assert names.sample_id("seq1-alice-003", regex) == f"seq1-{names.patient('alice')}-003"
    assert names.sample_id("odd_file", regex) == names.patient("odd_file")


def test_unknown_patient_is_a_clear_error() -> None:
    names = pseudonym.Pseudonyms({"A_1001": "P01"})
    with pytest.raises(DataError, match="'Li_Wei_0000200001' has no pseudonym"):
        names.sample_id(USERS_STYLE[3])


def test_text_replaces_labels_names_and_ids_but_not_inside_other_words() -> None:
    names = pseudonym.Pseudonyms({"Chen_Fang_0000103366": "P02", "Li_0000200001": "P01"})
    title = (f"{USERS_STYLE[0]} [ok] Dice 0.8; Chen Fang again, id 0000103366, folder Chen_Fang/; "
             f"Linear fit, Li_0000200001 and Li")
    assert names.text(title) == ("P02__1-4_1_04B2D3CF_frame_000034 [ok] Dice 0.8; P02 again, id P02, folder P02/; "
                                 "Linear fit, P01 and P01")
    assert names.leaks(title) == sorted({"Chen_Fang_0000103366", "Chen Fang", "0000103366", "Chen_Fang",
                                         "Li_0000200001", "Li"})
    assert names.leaks(names.text(title)) == []
    assert "Linear" in names.text(title)  # "Li" inside a word is not a name
    assert "90000103366" in names.text("x90000103366")  # nor an id inside a longer number


def test_a_name_shared_by_two_patients_is_redacted_not_guessed() -> None:
    names = pseudonym.Pseudonyms({"Chen_Fang_0000000001": "P01", "Chen_Fang_0000000002": "P02"})
    assert names.text("Chen_Fang_0000000002 and Chen Fang") == f"P02 and {pseudonym.AMBIGUOUS}"


def test_files_round_trip_and_rerun_is_stable(tmp_path: Path) -> None:
    run = tmp_path / "outputs" / "demo"
    demo = [patient_name(i) for i in range(4)]
    first = pseudonym.load_or_create(run, demo[:3])
    assert (run / pseudonym.SALT_FILE).is_file() and (run / pseudonym.MAPPING_FILE).is_file()
    salt = (run / pseudonym.SALT_FILE).read_text()
    again = pseudonym.load_or_create(run, reversed(demo[:3]))
    assert again.mapping == first.mapping
    assert pseudonym.load(run).mapping == first.mapping
    grown = pseudonym.load_or_create(run, demo)
    assert {p: grown.patient(p) for p in demo[:3]} == first.mapping and grown.patient(demo[3]) == "P04"
    assert (run / pseudonym.SALT_FILE).read_text() == salt
    rows = (run / pseudonym.MAPPING_FILE).read_text().splitlines()
    assert rows[0] == "pseudonym,patient" and [r.split(",")[0] for r in rows[1:]] == ["P01", "P02", "P03", "P04"]
    # a fresh folder has another salt, and so (almost surely, over four patients) may number them differently
    other = pseudonym.load_or_create(tmp_path / "other", demo)
    assert (tmp_path / "other" / pseudonym.SALT_FILE).read_text() != salt
    assert sorted(other.mapping.values()) == sorted(grown.mapping.values())


def test_damaged_files_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pseudonyms.csv is missing"):
        pseudonym.load(tmp_path)
    pseudonym.load_or_create(tmp_path, ["A_1001", "B_1002"])
    mapping = tmp_path / pseudonym.MAPPING_FILE
    mapping.write_text("pseudonym,patient\nP01,A_1001\nP01,B_1002\n")
    with pytest.raises(DataError, match="share one pseudonym"):
        pseudonym.load(tmp_path)
    mapping.write_text("name;id\n")
    with pytest.raises(DataError, match="is not a pseudonym mapping"):
        pseudonym.load_or_create(tmp_path, ["A_1001"])
    (tmp_path / pseudonym.SALT_FILE).write_text("not a salt\n")
    with pytest.raises(DataError, match="does not hold a pseudonym salt"):
        pseudonym.load_or_create(tmp_path, ["A_1001"])
