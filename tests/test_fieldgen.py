"""Tests for agent.fieldgen, the deterministic humanitarian field-record generator.

The generator is the source of every dataset used to test and benchmark sync, so these tests pin
what other code relies on: reproducibility (across runs, processes and chunkings), key
uniqueness, internal consistency of each record, and realistic record sizes.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from agent import fieldgen
from agent.fieldgen import (
    ADMIN1_COUNTRY,
    ADMIN_BOUNDS,
    ADMIN_CODES,
    BENEFICIARY_KEY,
    DATE_MAX,
    DATE_MIN,
    DISTRIBUTION_KEY,
    ITEM_UNITS,
    MODALITIES,
    REGISTRATION_STATUSES,
    RELATIONS,
    SITES,
    VULNERABILITY_FLAGS,
    beneficiaries,
    distributions,
    records,
    write_ndjson,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
COLLECTIONS = ("beneficiaries", "distributions")
JSON_TYPES = (str, int, float, bool, type(None), list, dict)
E164 = re.compile(r"^\+[1-9]\d{7,14}$")

# SHA-256 of write_ndjson(..., count=200, seed=7) per collection.  If a change to the generator is
# intended, update these and say so in the commit: every dataset generated before will differ.
GOLDEN_SHA256 = {
    "beneficiaries": "28cc4ec73d72d642f354e326797ff282cb26ae77a4c5828826d9111c761cee9d",
    "distributions": "e4b7e54caed62ecf4f0514720e7b9a1d7b44440c150dd59b565c83343e8c45b3",
}


def compact(record: dict[str, Any]) -> str:
    """Serialise exactly like write_ndjson does (compact, UTF-8, insertion order)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def digest(collection: str, count: int, seed: int) -> str:
    """Hash of a generated dataset, for cheap equality checks across processes."""
    text = "".join(compact(r) + "\n" for r in records(collection, count, seed=seed))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assert_json_types(value: Any) -> None:
    """Records must contain only JSON-native types so any store can round-trip them."""
    assert isinstance(value, JSON_TYPES), type(value)
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str)
            assert_json_types(item)
    elif isinstance(value, list):
        for item in value:
            assert_json_types(item)


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_same_seed_same_records(collection: str) -> None:
    assert list(records(collection, 50, seed=3)) == list(records(collection, 50, seed=3))


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_different_seeds_differ(collection: str) -> None:
    first = list(records(collection, 20, seed=1))
    second = list(records(collection, 20, seed=2))
    assert all(a != b for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_chunking_does_not_change_records(collection: str) -> None:
    whole = list(records(collection, 15, seed=9))
    assert list(records(collection, 10, seed=9, start=5)) == whole[5:15]
    chunks = [
        record
        for start in range(0, 15, 4)
        for record in records(collection, min(4, 15 - start), seed=9, start=start)
    ]
    assert chunks == whole


def test_chunking_with_explicit_beneficiary_count() -> None:
    whole = list(distributions(30, seed=4, beneficiary_count=7))
    assert list(distributions(12, seed=4, start=18, beneficiary_count=7)) == whole[18:]


def test_deterministic_across_processes_and_hash_seeds() -> None:
    """String seeds must not depend on PYTHONHASHSEED (Random hashes str seeds with SHA-512)."""
    script = (
        "import hashlib, json\n"
        "from agent.fieldgen import records\n"
        "for c in ('beneficiaries', 'distributions'):\n"
        "    text = ''.join(json.dumps(r, ensure_ascii=False, separators=(',', ':')) + '\\n'\n"
        "                   for r in records(c, 40, seed=5))\n"
        "    print(hashlib.sha256(text.encode('utf-8')).hexdigest())\n"
    )
    expected = [digest("beneficiaries", 40, 5), digest("distributions", 40, 5)]
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.split() == expected


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_golden_output_is_stable(tmp_path: Path, collection: str) -> None:
    path = tmp_path / f"{collection}.ndjson"
    write_ndjson(path, collection, 200, seed=7)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == GOLDEN_SHA256[collection]


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def test_keys_unique_and_stable_format() -> None:
    bens = list(beneficiaries(3000, seed=11))
    dsts = list(distributions(3000, seed=11))
    ben_ids = [b[BENEFICIARY_KEY] for b in bens]
    dst_ids = [d[DISTRIBUTION_KEY] for d in dsts]
    assert len(set(ben_ids)) == len(ben_ids)
    assert len(set(dst_ids)) == len(dst_ids)
    assert all(re.fullmatch(r"BEN-011-\d{8}", key) for key in ben_ids)
    assert all(re.fullmatch(r"DST-011-\d{8}", key) for key in dst_ids)
    assert ben_ids == sorted(ben_ids)


def test_keys_unique_across_chunks() -> None:
    first = {b[BENEFICIARY_KEY] for b in beneficiaries(100, seed=1)}
    second = {b[BENEFICIARY_KEY] for b in beneficiaries(100, seed=1, start=100)}
    assert not first & second


# --------------------------------------------------------------------------------------------
# Beneficiary content
# --------------------------------------------------------------------------------------------


@functools.cache
def _sample() -> tuple[dict[str, Any], ...]:
    """Shared sample (generated once per test session; tests must not mutate it)."""
    return tuple(beneficiaries(3000, seed=2))


def test_beneficiary_fields_and_json_types() -> None:
    expected = {
        "beneficiary_id",
        "given_name",
        "family_name",
        "sex",
        "birth_date",
        "phone",
        "admin1",
        "admin2",
        "admin3",
        "gps",
        "household_size",
        "members",
        "vulnerability_flags",
        "registration_date",
        "registration_status",
        "registered_by",
    }
    for record in _sample():
        assert set(record) == expected
        assert_json_types(record)
        assert json.loads(compact(record)) == record
        assert record["sex"] in ("female", "male")
        assert record["registration_status"] in REGISTRATION_STATUSES
        assert re.fullmatch(r"ENU-[A-Z]{2}-\d{3}", record["registered_by"])
        assert record["registered_by"][4:6] == ADMIN1_COUNTRY[record["admin1"]]
        assert set(record["vulnerability_flags"]) <= set(VULNERABILITY_FLAGS)
        assert len(set(record["vulnerability_flags"])) == len(record["vulnerability_flags"])


def test_household_size_matches_members() -> None:
    sizes: Counter[int] = Counter()
    for record in _sample():
        members = record["members"]
        assert 1 <= record["household_size"] <= 12
        assert len(members) == record["household_size"]
        head = members[0]
        assert head["relation"] == "head"
        assert head["name"] == f"{record['given_name']} {record['family_name']}"
        assert head["sex"] == record["sex"]
        assert head["birth_date"] == record["birth_date"]
        assert [m["relation"] for m in members].count("head") == 1
        assert [m["relation"] for m in members].count("spouse") <= 1
        for member in members:
            assert set(member) == {"name", "sex", "birth_date", "relation"}
            assert member["relation"] in RELATIONS
            assert member["sex"] in ("female", "male")
        sizes[record["household_size"]] += 1
    assert len(sizes) >= 10  # the whole 1..12 range is exercised, not a constant


def test_admin_hierarchy_constant_is_consistent() -> None:
    assert len(ADMIN_CODES) >= 4
    for admin1, admin2s in ADMIN_CODES.items():
        assert re.fullmatch(r"[A-Z]{2}\d{2}", admin1)
        assert admin1 in ADMIN1_COUNTRY
        assert admin1[:2] == ADMIN1_COUNTRY[admin1]
        assert SITES.get(admin1)
        for admin2, admin3s in admin2s.items():
            assert re.fullmatch(rf"{admin1}-\d{{2}}", admin2)
            assert admin3s
            for admin3 in admin3s:
                assert re.fullmatch(rf"{admin2}-\d{{3}}", admin3)
                lat_min, lat_max, lon_min, lon_max = ADMIN_BOUNDS[admin3]
                p_lat_min, p_lat_max, p_lon_min, p_lon_max = ADMIN_BOUNDS[admin1]
                assert p_lat_min <= lat_min < lat_max <= p_lat_max + 1e-9
                assert p_lon_min <= lon_min < lon_max <= p_lon_max + 1e-9


def test_records_follow_admin_hierarchy_and_gps() -> None:
    seen_admin1: set[str] = set()
    for record in _sample():
        admin1, admin2, admin3 = record["admin1"], record["admin2"], record["admin3"]
        assert admin2 in ADMIN_CODES[admin1]
        assert admin3 in ADMIN_CODES[admin1][admin2]
        assert admin2.startswith(admin1 + "-")
        assert admin3.startswith(admin2 + "-")
        lat, lon = record["gps"]["lat"], record["gps"]["lon"]
        assert set(record["gps"]) == {"lat", "lon"}
        assert round(lat, 5) == lat
        assert round(lon, 5) == lon
        lat_min, lat_max, lon_min, lon_max = ADMIN_BOUNDS[admin3]
        assert lat_min - 1e-5 <= lat <= lat_max + 1e-5
        assert lon_min - 1e-5 <= lon <= lon_max + 1e-5
        seen_admin1.add(admin1)
    assert seen_admin1 == set(ADMIN_CODES)


def test_dates_are_plausible() -> None:
    today = date.today()
    ages: list[float] = []
    for record in _sample():
        registered = date.fromisoformat(record["registration_date"])
        assert DATE_MIN <= registered <= DATE_MAX
        for member in record["members"]:
            born = date.fromisoformat(member["birth_date"])
            assert born <= registered <= today, "birth_date in the future"
            age = (registered - born).days / 365.2425
            assert 0 <= age < 91
            ages.append(age)
    children = sum(age < 18 for age in ages) / len(ages)
    assert 0.3 < children < 0.7  # displaced populations are young
    assert any(age >= 60 for age in ages)


def test_children_are_spaced_and_head_old_enough() -> None:
    for record in _sample():
        head_born = date.fromisoformat(record["birth_date"])
        born = sorted(
            date.fromisoformat(m["birth_date"])
            for m in record["members"]
            if m["relation"] == "child"
        )
        assert all((later - earlier).days >= 365 for earlier, later in itertools.pairwise(born))
        assert all((child - head_born).days >= 16 * 365 for child in born)


def test_phones_and_flags_are_realistic() -> None:
    phones = [r["phone"] for r in _sample()]
    missing = sum(p is None for p in phones) / len(phones)
    assert 0.08 < missing < 0.25
    assert all(E164.match(p) for p in phones if p is not None)
    flags = Counter(f for r in _sample() for f in r["vulnerability_flags"])
    assert set(flags) == set(VULNERABILITY_FLAGS)
    for record in _sample():
        flagged = record["vulnerability_flags"]
        assert ("female_headed" in flagged) == (record["sex"] == "female")
        head_age = (
            date.fromisoformat(record["registration_date"])
            - date.fromisoformat(record["birth_date"])
        ).days / 365.2425
        assert ("unaccompanied_minor" in flagged) == (head_age < 18)
        assert ("elderly_head" in flagged) == (head_age >= 60)


def test_name_pools_are_multi_region() -> None:
    regions = fieldgen._NAMES
    assert {"east_africa", "sahel", "middle_east", "south_asia"} <= set(regions)
    for names in regions.values():
        assert len(set(names.female)) >= 40
        assert len(set(names.male)) >= 40
        assert len(set(names.family)) >= 40


# --------------------------------------------------------------------------------------------
# Distribution content
# --------------------------------------------------------------------------------------------


def test_distributions_reference_existing_consistent_beneficiaries() -> None:
    count = 1500
    bens = {b[BENEFICIARY_KEY]: b for b in beneficiaries(count, seed=6)}
    modalities: Counter[str] = Counter()
    for record in distributions(count, seed=6):
        assert_json_types(record)
        assert set(record) == {
            "distribution_id",
            "beneficiary_id",
            "site",
            "distribution_date",
            "items",
            "modality",
            "distributed_by",
        }
        beneficiary = bens[record[BENEFICIARY_KEY]]  # default: references index < count
        assert record["site"] in SITES[beneficiary["admin1"]]
        distributed = date.fromisoformat(record["distribution_date"])
        assert date.fromisoformat(beneficiary["registration_date"]) <= distributed <= DATE_MAX
        assert record["modality"] in MODALITIES
        assert record["distributed_by"][4:6] == ADMIN1_COUNTRY[beneficiary["admin1"]]
        assert record["items"]
        for line in record["items"]:
            assert set(line) == {"item", "quantity", "unit"}
            assert ITEM_UNITS[line["item"]] == line["unit"]
            assert isinstance(line["quantity"], int | float)
            assert line["quantity"] > 0
        modalities[record["modality"]] += 1
    assert set(modalities) == set(MODALITIES)


def test_distribution_rations_scale_with_household() -> None:
    bens = list(beneficiaries(400, seed=8))
    for record in distributions(400, seed=8):
        if record["modality"] != "in_kind":
            continue
        beneficiary = bens[int(record[BENEFICIARY_KEY].rsplit("-", 1)[1])]
        staple = record["items"][0]
        assert staple["unit"] == "kg"
        assert staple["quantity"] == 12 * beneficiary["household_size"]


def test_explicit_beneficiary_count_bounds_references() -> None:
    indices = {
        int(d[BENEFICIARY_KEY].rsplit("-", 1)[1])
        for d in distributions(500, seed=3, beneficiary_count=20)
    }
    assert indices <= set(range(20))
    assert len(indices) > 10


def test_default_references_stay_below_start_plus_count() -> None:
    for record in distributions(50, seed=3, start=100):
        assert int(record[BENEFICIARY_KEY].rsplit("-", 1)[1]) < 150


# --------------------------------------------------------------------------------------------
# Sizes and speed
# --------------------------------------------------------------------------------------------


def test_record_sizes_are_realistic() -> None:
    ben_sizes = [len(compact(r).encode("utf-8")) for r in beneficiaries(2000, seed=1)]
    dst_sizes = [len(compact(r).encode("utf-8")) for r in distributions(2000, seed=1)]
    assert 500 <= sum(ben_sizes) / len(ben_sizes) <= 800
    assert 250 <= sum(dst_sizes) / len(dst_sizes) <= 400
    assert max(ben_sizes) < 2000
    assert max(dst_sizes) < 600


# --------------------------------------------------------------------------------------------
# records() dispatch, validation and write_ndjson
# --------------------------------------------------------------------------------------------


def test_records_dispatch() -> None:
    assert list(records("beneficiaries", 3, seed=4)) == list(beneficiaries(3, seed=4))
    assert list(records("distributions", 3, seed=4)) == list(distributions(3, seed=4))
    assert list(records("beneficiaries", 0)) == []


def test_unknown_collection_raises_with_name() -> None:
    with pytest.raises(ValueError, match="shelters"):
        records("shelters", 5)


def test_invalid_arguments_raise_eagerly() -> None:
    with pytest.raises(ValueError, match="count"):
        beneficiaries(-1)
    with pytest.raises(ValueError, match="start"):
        distributions(1, start=-1)
    with pytest.raises(ValueError, match="beneficiary_count"):
        distributions(1, beneficiary_count=0)


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_write_ndjson(tmp_path: Path, collection: str) -> None:
    path = tmp_path / f"{collection}.ndjson"
    assert write_ndjson(path, collection, 250, seed=5) == 250
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.decode("utf-8").splitlines()
    assert len(lines) == 250
    expected = list(records(collection, 250, seed=5))
    for line, record in zip(lines, expected, strict=True):
        assert json.loads(line) == record
        assert line == compact(record)  # compact: no spaces after separators, no ASCII escapes
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


def test_write_ndjson_replaces_existing_file_and_accepts_str(tmp_path: Path) -> None:
    path = tmp_path / "data.ndjson"
    path.write_text("stale\n", encoding="utf-8")
    assert write_ndjson(str(path), "beneficiaries", 3, seed=1) == 3
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3
    assert write_ndjson(path, "beneficiaries", 0) == 0
    assert path.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.ndjson"]


def test_write_ndjson_unknown_collection_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.ndjson"
    with pytest.raises(ValueError, match="households"):
        write_ndjson(path, "households", 5)
    assert list(tmp_path.iterdir()) == []
