"""Seeded, deterministic generator of realistic humanitarian field records.

Why this exists: fieldsync has to be exercised (tests, benchmarks, demos, soak runs) against data
that looks like what field offices actually capture - household registrations and distribution
events with real-world shapes, sizes, Unicode names, missing phone numbers and nested lists - while
never touching real beneficiary data, which is protected personal information.

Design choices, and why:

* Only the standard library, so the generator runs anywhere the agent runs (including offline
  field laptops) and in CI without extra installs.
* Every record is generated from its own ``random.Random`` seeded with
  ``"{seed}:{collection}:{index}"``.  A record therefore depends only on ``(seed, collection,
  index)``: datasets can be produced in chunks, in parallel, resumed half-way, or regenerated on
  another machine and compared byte for byte.  ``Random`` hashes ``str`` seeds with SHA-512, so
  this is stable across processes regardless of ``PYTHONHASHSEED``.
* Distributions must point at a beneficiary that exists and whose facts they agree with (site in
  the beneficiary's province, date not before registration, ration scaled to household size).
  Rather than generate the whole beneficiary again, the first three draws of every beneficiary
  (place, registration date, household size) form a cheap "anchor" that a distribution replays
  from the beneficiary's own seed.
* The administrative hierarchy, GPS boxes and sites are fixed module constants so tests and
  reference data can check consistency without reimplementing the generator.
"""

from __future__ import annotations

import json
import random
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from datetime import date
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

from protocol.files import atomic_write

__all__ = [
    "ADMIN1_COUNTRY",
    "ADMIN1_NAMES",
    "ADMIN_BOUNDS",
    "ADMIN_CODES",
    "BENEFICIARY_KEY",
    "COLLECTIONS",
    "DATE_MAX",
    "DATE_MIN",
    "DISTRIBUTION_KEY",
    "ITEM_UNITS",
    "MODALITIES",
    "REGISTRATION_STATUSES",
    "RELATIONS",
    "SITES",
    "VULNERABILITY_FLAGS",
    "beneficiaries",
    "distributions",
    "records",
    "write_ndjson",
]

BENEFICIARY_KEY = "beneficiary_id"
DISTRIBUTION_KEY = "distribution_id"

BENEFICIARIES = "beneficiaries"
DISTRIBUTIONS = "distributions"
COLLECTIONS: tuple[str, ...] = (BENEFICIARIES, DISTRIBUTIONS)

# Registration and distribution dates fall inside this window (inclusive).  Birth dates are
# computed backwards from the registration date, so they can never lie after it.
DATE_MIN = date(2024, 1, 1)
DATE_MAX = date(2026, 10, 31)
_ORD_MIN = DATE_MIN.toordinal()
_ORD_MAX = DATE_MAX.toordinal()
_DAYS_PER_YEAR = 365.2425
_MAX_AGE = 90

VULNERABILITY_FLAGS: tuple[str, ...] = (
    "female_headed",
    "elderly_head",
    "unaccompanied_minor",
    "disability",
    "chronic_illness",
    "pregnant_lactating",
)
RELATIONS: tuple[str, ...] = (
    "head",
    "spouse",
    "child",
    "grandchild",
    "sibling",
    "parent",
    "other_relative",
)
REGISTRATION_STATUSES: tuple[str, ...] = (
    "registered",
    "verified",
    "pending_verification",
    "inactive",
    "suspended",
)
MODALITIES: tuple[str, ...] = ("in_kind", "cash", "voucher")

# --------------------------------------------------------------------------------------------
# Names.  Four regions, each with >= 40 female given names, male given names and family names.
# Some are deliberately non-ASCII so that downstream encoding paths are exercised.
# --------------------------------------------------------------------------------------------


class _Names(NamedTuple):
    """Name pools of one region (tuples, so generation cannot be altered from outside)."""

    female: tuple[str, ...]
    male: tuple[str, ...]
    family: tuple[str, ...]


def _split(text: str) -> tuple[str, ...]:
    """Split a comma-separated literal; keeps long name lists readable and line-length friendly."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


_NAMES: dict[str, _Names] = {
    "east_africa": _Names(
        female=_split(
            "Amina, Halima, Fatuma, Wanjiru, Akinyi, Achieng, Njeri, Wambui, Chebet, Jepkosgei,"
            " Auma, Atieno, Nasra, Hodan, Faduma, Sahra, Ayaan, Deqa, Ifrah, Ikran, Hawa, Zamzam,"
            " Nyaboth, Nyakuoth, Nyandeng, Abuk, Achol, Ayen, Adut, Akuol, Apiyo, Nakiru, Akai,"
            " Mwajuma, Rehema, Zawadi, Neema, Imani, Furaha, Esther, Grace, Mercy, Nafula,"
            " Naliaka, Nekesa"
        ),
        male=_split(
            "Abdi, Mohamed, Hassan, Ahmed, Ali, Omar, Yusuf, Abdirahman, Abdullahi, Farah,"
            " Ibrahim, Mahad, Guled, Kamau, Mwangi, Otieno, Ochieng, Odhiambo, Kiprono, Kibet,"
            " Wafula, Barasa, Mutua, Musyoka, Juma, Baraka, Emmanuel, Joseph, Peter, John, Deng,"
            " Garang, Majok, Chol, Akol, Lual, Gatluak, Ekeno, Lokwang, Ewoi, Lokol, Ebei"
        ),
        family=_split(
            "Hassan, Mohamed, Abdi, Ali, Farah, Warsame, Osman, Aden, Jama, Ismail, Yusuf, Omar,"
            " Kamau, Mwangi, Njoroge, Otieno, Ochieng, Odhiambo, Onyango, Wekesa, Wafula, Mutua,"
            " Kiprotich, Cheruiyot, Kiptoo, Rotich, Mohamud, Deng, Garang, Majok, Akol, Mabior,"
            " Lual, Gatkuoth, Ekiru, Lokwang, Ewoi, Lomuria, Nanok, Wanyama, Bakari, Mwakilema"
        ),
    ),
    "sahel": _Names(
        female=_split(
            "Aïchatou, Hadiza, Mariama, Fati, Zeinabou, Rakia, Habsatou, Hawa, Salamatou,"
            " Balkissa, Ramatou, Hassana, Safiatou, Maïmouna, Halimatou, Zalika, Kadidiatou,"
            " Nafissa, Roukaya, Saratou, Absatou, Amina, Fatouma, Hamsatou, Adama, Binta,"
            " Djamila, Falmata, Kaltouma, Aïssa, Yagana, Bintou, Oumou, Mariam, Hadjara, Lami,"
            " Nana, Rabi, Hindatou, Mamou, Fadimata, Zara"
        ),
        male=_split(
            "Moussa, Issoufou, Mahamadou, Abdoulaye, Boubacar, Hamidou, Seydou, Ibrahim, Oumarou,"
            " Amadou, Soumaïla, Harouna, Adamou, Ousmane, Idrissa, Garba, Salifou, Hassane,"
            " Alhassane, Abdou, Souleymane, Mamane, Yacouba, Kader, Laouali, Nouhou, Bachir,"
            " Mounkaïla, Halidou, Zakari, Sani, Aboubacar, Djibo, Hamadou, Issa, Inoussa,"
            " Abdourahamane, Ibrahima, Bello, Tahirou, Kabirou, Chaïbou"
        ),
        family=_split(
            "Issoufou, Mahamadou, Abdou, Moussa, Hamani, Diori, Kountché, Maïnassara, Tandja,"
            " Ousmane, Garba, Boubacar, Amadou, Souley, Idrissa, Djibo, Hassane, Harouna,"
            " Soumana, Halidou, Oumarou, Adamou, Seyni, Mounkaïla, Zakari, Saïdou, Bako, Maman,"
            " Laouali, Yacouba, Barmou, Kané, Diallo, Bah, Sow, Cissé, Touré, Maïga, Sidibé,"
            " Modi, Mallam, Boukar, Kolo, Goni, Bukar"
        ),
    ),
    "middle_east": _Names(
        female=_split(
            "Fatima, Aisha, Maryam, Zainab, Khadija, Layla, Noor, Rania, Hala, Huda, Samar, Reem,"
            " Dana, Lina, Rasha, Mona, Amal, Hiba, Yasmin, Salma, Rahaf, Sara, Ghada, Nisreen,"
            " Suha, Wafa, Manal, Hanan, Lubna, Najla, Rawan, Duaa, Asmaa, Batoul, Shahed, Jana,"
            " Lujain, Malak, Tasneem, Bayan, Haneen, Areej"
        ),
        male=_split(
            "Mohammed, Ahmad, Khaled, Omar, Ali, Hussein, Hassan, Mahmoud, Mustafa, Youssef,"
            " Ibrahim, Abdullah, Samir, Tariq, Walid, Bassam, Fadi, Rami, Ziad, Nabil, Majed,"
            " Hamza, Anas, Yazan, Qusai, Bilal, Osama, Ammar, Firas, Hani, Jamal, Karim, Louay,"
            " Mazen, Nizar, Rashid, Saleh, Tamer, Wael, Zaid, Adnan, Fouad"
        ),
        family=_split(
            "Al-Hassan, Al-Ahmad, Al-Khatib, Al-Masri, Al-Halabi, Al-Homsi, Al-Shami, Haddad,"
            " Khoury, Nasser, Saleh, Hamdan, Darwish, Abboud, Al-Ali, Al-Hussein, Mansour, Qasem,"
            " Othman, Jaber, Ibrahim, Youssef, Sabbagh, Kassem, Al-Zoubi, Al-Rifai, Al-Hariri,"
            " Al-Masalmeh, Al-Hamwi, Al-Idlibi, Al-Deiri, Barakat, Shaheen, Al-Omari, Al-Kurdi,"
            " Suleiman, Al-Sayed, Ghanem, Al-Najjar, Al-Tamimi, Al-Jaafari, Al-Khalil"
        ),
    ),
    "south_asia": _Names(
        female=_split(
            "Rashida, Hasina, Jamalida, Umme Salma, Rabeya, Shamsun Nahar, Setara, Minara,"
            " Jannatara, Sabekun Nahar, Tasmin, Noor Ankis, Rozina, Fatema, Ayesha, Khaleda,"
            " Nasima, Shahida, Taslima, Sufia, Rehana, Jahanara, Momtaz, Parvin, Shirin, Nargis,"
            " Razia, Salma, Sultana, Morjina, Anowara, Rokeya, Hamida, Halima, Johura, Kohinur,"
            " Laila, Moriyom, Nurjahan, Rokshana, Tahmina, Yasmin"
        ),
        male=_split(
            "Mohammed, Abdul Karim, Nur Alam, Abul Kalam, Mohammad Ayub, Rafiq, Kamal, Jamal,"
            " Hossain, Rahim, Karim, Abdur Rahman, Anwar, Habibur, Mizanur, Shafiq, Sirajul,"
            " Zahid, Faruk, Nurul Islam, Abu Taher, Hamid, Sayed, Yunus, Ismail, Jubair,"
            " Shahidul, Mostafa, Rashed, Selim, Sohel, Alamgir, Belal, Delwar, Enamul, Forkan,"
            " Giasuddin, Harun, Iqbal, Jashim, Liakat, Nazrul"
        ),
        family=_split(
            "Rahman, Hossain, Islam, Uddin, Ahmed, Ali, Khan, Alam, Miah, Sarkar, Chowdhury,"
            " Talukder, Sheikh, Molla, Haque, Karim, Ullah, Kabir, Hasan, Mahmud, Rashid,"
            " Bhuiyan, Mondal, Sikder, Howlader, Das, Barua, Sultan, Jahan, Amin, Siddique,"
            " Majumder, Biswas, Noor, Hamid, Salam, Zaman, Akbar, Habib, Kalam, Jalal, Faruqi"
        ),
    ),
}

# --------------------------------------------------------------------------------------------
# Geography: countries, a fixed admin1 > admin2 > admin3 hierarchy, GPS boxes and sites.
# --------------------------------------------------------------------------------------------


class _Country(NamedTuple):
    """Per-country facts that shape a record (names, phones, modalities, rations)."""

    region: str
    dial_code: str
    mobile_prefixes: tuple[str, ...]
    subscriber_digits: int
    no_phone_rate: float
    staple: str
    cash_per_person_usd: float
    modality_weights: tuple[float, float, float]  # in_kind, cash, voucher


_COUNTRIES: dict[str, _Country] = {
    # Kenya (Turkana, Garissa): mixed camp populations, mostly in-kind food baskets.
    "KE": _Country(
        region="east_africa",
        dial_code="+254",
        mobile_prefixes=("70", "71", "72", "74", "79"),
        subscriber_digits=7,
        no_phone_rate=0.12,
        staple="maize_flour",
        cash_per_person_usd=8.0,
        modality_weights=(0.55, 0.25, 0.20),
    ),
    # Niger (Diffa, Tillabéri): low phone ownership, sorghum-based rations.
    "NE": _Country(
        region="sahel",
        dial_code="+227",
        mobile_prefixes=("88", "89", "90", "91", "96", "97"),
        subscriber_digits=6,
        no_phone_rate=0.25,
        staple="sorghum",
        cash_per_person_usd=10.0,
        modality_weights=(0.70, 0.15, 0.15),
    ),
    # Jordan (Mafraq, Irbid): urban and camp refugees, predominantly cash assistance.
    "JO": _Country(
        region="middle_east",
        dial_code="+962",
        mobile_prefixes=("77", "78", "79"),
        subscriber_digits=7,
        no_phone_rate=0.05,
        staple="wheat_flour",
        cash_per_person_usd=32.0,
        modality_weights=(0.15, 0.60, 0.25),
    ),
    # Bangladesh (Cox's Bazar): e-voucher outlets plus in-kind rice.
    "BD": _Country(
        region="south_asia",
        dial_code="+880",
        mobile_prefixes=("13", "15", "16", "17", "18", "19"),
        subscriber_digits=8,
        no_phone_rate=0.20,
        staple="rice",
        cash_per_person_usd=12.0,
        modality_weights=(0.40, 0.00, 0.60),
    ),
}


class _Admin1Spec(NamedTuple):
    """Static description of one admin1 unit from which the hierarchy is built."""

    code: str
    name: str
    country: str
    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float
    weight: float  # share of registrations
    admin3_per_admin2: tuple[int, ...]
    sites: tuple[str, ...]


_ADMIN1_SPECS: tuple[_Admin1Spec, ...] = (
    _Admin1Spec(
        code="KE01",
        name="Turkana",
        country="KE",
        lat_min=2.90,
        lat_max=4.20,
        lon_min=34.40,
        lon_max=35.90,
        weight=22.0,
        admin3_per_admin2=(4, 3, 5),
        sites=("SITE-KAK-01", "SITE-KAL-01"),
    ),
    _Admin1Spec(
        code="KE02",
        name="Garissa",
        country="KE",
        lat_min=-1.00,
        lat_max=0.60,
        lon_min=39.50,
        lon_max=41.00,
        weight=18.0,
        admin3_per_admin2=(3, 4, 3),
        sites=("SITE-DAG-01", "SITE-HAG-01"),
    ),
    _Admin1Spec(
        code="NE01",
        name="Diffa",
        country="NE",
        lat_min=13.20,
        lat_max=14.40,
        lon_min=11.80,
        lon_max=13.60,
        weight=12.0,
        admin3_per_admin2=(4, 3),
        sites=("SITE-DIF-01", "SITE-SAY-01"),
    ),
    _Admin1Spec(
        code="NE02",
        name="Tillabéri",
        country="NE",
        lat_min=13.30,
        lat_max=15.20,
        lon_min=0.60,
        lon_max=2.80,
        weight=10.0,
        admin3_per_admin2=(3, 3, 4),
        sites=("SITE-OUA-01",),
    ),
    _Admin1Spec(
        code="JO01",
        name="Mafraq",
        country="JO",
        lat_min=32.10,
        lat_max=32.50,
        lon_min=36.10,
        lon_max=37.20,
        weight=14.0,
        admin3_per_admin2=(4, 4),
        sites=("SITE-ZAA-01", "SITE-MAF-01"),
    ),
    _Admin1Spec(
        code="JO02",
        name="Irbid",
        country="JO",
        lat_min=32.45,
        lat_max=32.70,
        lon_min=35.70,
        lon_max=36.05,
        weight=8.0,
        admin3_per_admin2=(3, 3),
        sites=("SITE-IRB-01",),
    ),
    _Admin1Spec(
        code="BD01",
        name="Cox's Bazar",
        country="BD",
        lat_min=20.90,
        lat_max=21.30,
        lon_min=92.05,
        lon_max=92.25,
        weight=16.0,
        admin3_per_admin2=(5, 4, 3),
        sites=("SITE-KTP-01", "SITE-NYP-01"),
    ),
)


class _Place(NamedTuple):
    """One admin3 unit with everything a record needs about where it is."""

    admin1: str
    admin2: str
    admin3: str
    country: str
    lat0: float
    dlat: float
    lon0: float
    dlon: float


def _build_geography() -> tuple[
    dict[str, dict[str, list[str]]],
    dict[str, tuple[float, float, float, float]],
    tuple[_Place, ...],
    list[float],
]:
    """Derive codes, bounding boxes and weighted admin3 places from ``_ADMIN1_SPECS``.

    Admin2 units split their admin1 box into longitude strips and admin3 units split their
    admin2 strip into latitude bands, so a GPS point drawn inside an admin3 box is also inside
    its admin2 and admin1 boxes: coordinates agree with the codes at every level.
    """
    codes: dict[str, dict[str, list[str]]] = {}
    bounds: dict[str, tuple[float, float, float, float]] = {}
    places: list[_Place] = []
    weights: list[float] = []
    for spec in _ADMIN1_SPECS:
        codes[spec.code] = {}
        bounds[spec.code] = (spec.lat_min, spec.lat_max, spec.lon_min, spec.lon_max)
        n_admin2 = len(spec.admin3_per_admin2)
        n_admin3_total = sum(spec.admin3_per_admin2)
        lon_step = (spec.lon_max - spec.lon_min) / n_admin2
        for j, n_admin3 in enumerate(spec.admin3_per_admin2):
            admin2 = f"{spec.code}-{j + 1:02d}"
            lon0 = spec.lon_min + j * lon_step
            bounds[admin2] = (spec.lat_min, spec.lat_max, lon0, lon0 + lon_step)
            lat_step = (spec.lat_max - spec.lat_min) / n_admin3
            admin3_codes: list[str] = []
            for k in range(n_admin3):
                admin3 = f"{admin2}-{k + 1:03d}"
                lat0 = spec.lat_min + k * lat_step
                bounds[admin3] = (lat0, lat0 + lat_step, lon0, lon0 + lon_step)
                admin3_codes.append(admin3)
                places.append(
                    _Place(spec.code, admin2, admin3, spec.country, lat0, lat_step, lon0, lon_step)
                )
                weights.append(spec.weight / n_admin3_total)
            codes[spec.code][admin2] = admin3_codes
    return codes, bounds, tuple(places), list(accumulate(weights))


#: admin1 -> admin2 -> [admin3].  Codes nest by prefix: "KE01" > "KE01-02" > "KE01-02-003".
ADMIN_CODES: dict[str, dict[str, list[str]]]
#: Any admin code (all three levels) -> (lat_min, lat_max, lon_min, lon_max).
ADMIN_BOUNDS: dict[str, tuple[float, float, float, float]]
ADMIN_CODES, ADMIN_BOUNDS, _PLACES, _PLACE_CUM = _build_geography()
_PLACE_TOTAL = _PLACE_CUM[-1]

#: admin1 -> ISO 3166-1 alpha-2 country code.
ADMIN1_COUNTRY: dict[str, str] = {spec.code: spec.country for spec in _ADMIN1_SPECS}
#: admin1 -> human-readable province/governorate/district name.
ADMIN1_NAMES: dict[str, str] = {spec.code: spec.name for spec in _ADMIN1_SPECS}
#: admin1 -> distribution sites serving it.
SITES: dict[str, list[str]] = {spec.code: list(spec.sites) for spec in _ADMIN1_SPECS}
_SITES: dict[str, tuple[str, ...]] = {spec.code: spec.sites for spec in _ADMIN1_SPECS}

#: item -> unit used in distribution records.
ITEM_UNITS: dict[str, str] = {
    "maize_flour": "kg",
    "sorghum": "kg",
    "wheat_flour": "kg",
    "rice": "kg",
    "pulses": "kg",
    "vegetable_oil": "l",
    "salt": "kg",
    "soap": "piece",
    "blanket": "piece",
    "jerrycan": "piece",
    "sleeping_mat": "piece",
    "kitchen_set": "piece",
    "cash_transfer": "USD",
    "cash_voucher": "USD",
}

# --------------------------------------------------------------------------------------------
# Sampling tables (cumulative weights for bisect: cheaper than random.choices per call).
# --------------------------------------------------------------------------------------------

# Household sizes 1..12, mean ~4.0 (camp registration data is typically 4-5 per household).
_HH_SIZE_CUM: list[float] = list(accumulate((15, 16, 17, 15, 12, 9, 6, 4, 2.6, 1.6, 1.0, 0.6)))
_HH_SIZE_TOTAL = _HH_SIZE_CUM[-1]

_OTHER_RELATIONS: tuple[str, ...] = ("child", "grandchild", "sibling", "parent", "other_relative")
_OTHER_REL_CUM: list[float] = list(accumulate((0.78, 0.06, 0.07, 0.04, 0.05)))

_STATUS_CUM: list[float] = list(accumulate((0.30, 0.55, 0.08, 0.04, 0.03)))

_NFI_ITEMS: tuple[str, ...] = ("soap", "blanket", "jerrycan", "sleeping_mat", "kitchen_set")
_ENUMERATORS_PER_COUNTRY = 40
_STAFF_PER_COUNTRY = 25


def _rng(seed: int, collection: str, index: int) -> random.Random:
    """Return the private generator of one record; the whole determinism contract lives here."""
    return random.Random(f"{seed}:{collection}:{index}")


def _beneficiary_id(seed: int, index: int) -> str:
    """Stable, unique-per-(seed, index) key, sortable in index order for non-negative seeds."""
    return f"BEN-{seed:03d}-{index:08d}"


def _distribution_id(seed: int, index: int) -> str:
    """Stable, unique-per-(seed, index) key for distribution events."""
    return f"DST-{seed:03d}-{index:08d}"


class _Anchor(NamedTuple):
    """Facts about a beneficiary that distributions need, replayable from its seed alone."""

    place: _Place
    registration_ord: int
    household_size: int


def _anchor(rng: random.Random) -> _Anchor:
    """Draw place, registration date and household size: always the first three draws.

    Both ``beneficiaries`` and ``distributions`` call this on a fresh beneficiary generator, so
    a distribution agrees with its beneficiary without generating the full record.
    """
    place = _PLACES[bisect_right(_PLACE_CUM, rng.random() * _PLACE_TOTAL)]
    registration_ord = _ORD_MIN + int(rng.random() * (_ORD_MAX - _ORD_MIN + 1))
    household_size = 1 + bisect_right(_HH_SIZE_CUM, rng.random() * _HH_SIZE_TOTAL)
    return _Anchor(place, registration_ord, household_size)


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    """Uniform choice; ``random()`` indexing is ~2x faster than ``Random.choice``."""
    return options[int(rng.random() * len(options))]


def _head_age(rng: random.Random) -> int:
    """Age of the household head: ~2% child-headed, ~10% elderly, adults skewed young."""
    r = rng.random()
    if r < 0.02:
        return 14 + int(rng.random() * 4)
    if r < 0.90:
        return 18 + int(rng.random() ** 1.3 * 42)
    return 60 + int(rng.random() ** 1.5 * (_MAX_AGE - 59))


def _member_age(rng: random.Random, relation: str, head_age: int) -> tuple[str, int]:
    """Plausible age (0-90) for a non-child, non-spouse member given the head's age.

    An implausible combination (a parent older than 90) falls back to another relation rather
    than producing an impossible household.  Children are handled by ``_ChildAges``.
    """
    u = rng.random()
    if relation == "grandchild":
        return relation, int(u * (min(17, head_age - 36) + 1))
    if relation == "sibling":
        return relation, max(0, min(_MAX_AGE, head_age + int((u - 0.5) * 20)))
    if relation == "parent":
        age = head_age + 18 + int(u * 17)
        if age <= _MAX_AGE:
            return relation, age
        return "other_relative", int(rng.random() * 70)
    return relation, int(u * 70)


class _ChildAges:
    """Ages of the head's children: oldest first, 1.2-3.5 years apart, head >= 16 at birth.

    Independent draws would give a 19-year-old three babies born weeks apart; spacing births
    keeps households believable.  Returns None once no further child fits (caller re-labels).
    """

    __slots__ = ("_next", "_rand")

    def __init__(self, rng: random.Random, head_age: int) -> None:
        self._rand = rng.random
        cap = max(0, min(head_age - 16, 30))
        self._next: float = (0.35 + 0.65 * self._rand()) * cap

    def take(self) -> float | None:
        """Exact age in years of the next child, or None if the mother would be too young."""
        years = self._next
        if years < 0.0:
            return None
        self._next = years - 1.2 - 2.3 * self._rand()
        return years


def _iso_before(registration_ord: int, years: float) -> str:
    """ISO date ``years`` (fractional) before the registration date; never after it."""
    return date.fromordinal(registration_ord - int(years * _DAYS_PER_YEAR)).isoformat()


def _birth_date(rng: random.Random, age: int, registration_ord: int) -> str:
    """ISO birth date for someone ``age`` full years old on the registration date."""
    return _iso_before(registration_ord, age + rng.random())


def _phone(rng: random.Random, country: _Country) -> str | None:
    """E.164 mobile number for the country, or None (no phone is common in the field)."""
    if rng.random() < country.no_phone_rate:
        return None
    digits = country.subscriber_digits
    return (
        f"{country.dial_code}{_pick(rng, country.mobile_prefixes)}"
        f"{int(rng.random() * 10**digits):0{digits}d}"
    )


def _beneficiary(seed: int, index: int) -> dict[str, Any]:
    """Build one household registration; the head is the beneficiary and ``members[0]``."""
    rng = _rng(seed, BENEFICIARIES, index)
    place, registration_ord, household_size = _anchor(rng)
    country = _COUNTRIES[place.country]
    names = _NAMES[country.region]
    rand = rng.random

    head_age = _head_age(rng)
    minor_head = head_age < 18
    head_sex = "female" if rand() < (0.5 if minor_head else 0.42) else "male"
    given_name = _pick(rng, names.female if head_sex == "female" else names.male)
    family_name = _pick(rng, names.family)
    birth_date = _birth_date(rng, head_age, registration_ord)

    members: list[dict[str, Any]] = [
        {
            "name": f"{given_name} {family_name}",
            "sex": head_sex,
            "birth_date": birth_date,
            "relation": "head",
        }
    ]
    ages: list[int] = [head_age]
    sexes: list[str] = [head_sex]
    remaining = household_size - 1
    if remaining and not minor_head and rand() < (0.85 if head_sex == "male" else 0.3):
        if head_sex == "male":
            sex, age = "female", max(16, head_age - 2 - int(rand() * 9))
        else:
            sex, age = "male", min(_MAX_AGE, head_age + 2 + int(rand() * 9))
        spouse_given = _pick(rng, names.female if sex == "female" else names.male)
        members.append(
            {
                "name": f"{spouse_given} {_pick(rng, names.family)}",
                "sex": sex,
                "birth_date": _birth_date(rng, age, registration_ord),
                "relation": "spouse",
            }
        )
        ages.append(age)
        sexes.append(sex)
        remaining -= 1
    children: _ChildAges | None = None
    for _ in range(remaining):
        years: float | None = None
        if minor_head:
            relation, age = "sibling", int(rand() * (head_age + 3))
        else:
            relation = _OTHER_RELATIONS[bisect_right(_OTHER_REL_CUM, rand())]
            if relation == "grandchild" and head_age < 38:
                relation = "child"
            if relation == "child":
                if children is None:
                    children = _ChildAges(rng, head_age)
                years = children.take()
            if years is not None:
                age = int(years)
            elif relation == "child":  # no room for another own child: a fostered niece, cousin
                relation, age = "other_relative", int(rand() * 18)
            else:
                relation, age = _member_age(rng, relation, head_age)
        sex = "female" if rand() < 0.5 else "male"
        member_given = _pick(rng, names.female if sex == "female" else names.male)
        members.append(
            {
                "name": f"{member_given} {family_name}",
                "sex": sex,
                "birth_date": (
                    _birth_date(rng, age, registration_ord)
                    if years is None
                    else _iso_before(registration_ord, years)
                ),
                "relation": relation,
            }
        )
        ages.append(age)
        sexes.append(sex)

    flags: list[str] = []
    if head_sex == "female":
        flags.append("female_headed")
    if head_age >= 60:
        flags.append("elderly_head")
    if minor_head:
        flags.append("unaccompanied_minor")
    if rand() < 0.07:
        flags.append("disability")
    if rand() < 0.09:
        flags.append("chronic_illness")
    childbearing = any(s == "female" and 15 <= a <= 49 for s, a in zip(sexes, ages, strict=True))
    if childbearing and rand() < (0.6 if min(ages) < 2 else 0.08):
        flags.append("pregnant_lactating")

    return {
        BENEFICIARY_KEY: _beneficiary_id(seed, index),
        "given_name": given_name,
        "family_name": family_name,
        "sex": head_sex,
        "birth_date": birth_date,
        "phone": _phone(rng, country),
        "admin1": place.admin1,
        "admin2": place.admin2,
        "admin3": place.admin3,
        "gps": {
            "lat": round(place.lat0 + rand() * place.dlat, 5),
            "lon": round(place.lon0 + rand() * place.dlon, 5),
        },
        "household_size": household_size,
        "members": members,
        "vulnerability_flags": flags,
        "registration_date": date.fromordinal(registration_ord).isoformat(),
        "registration_status": REGISTRATION_STATUSES[bisect_right(_STATUS_CUM, rand())],
        "registered_by": f"ENU-{place.country}-{1 + int(rand() * _ENUMERATORS_PER_COUNTRY):03d}",
    }


def _items(
    rng: random.Random, modality: str, country: _Country, household_size: int
) -> list[dict[str, Any]]:
    """Entitlement lines scaled to household size (WFP-like monthly ration / transfer value)."""
    rand = rng.random
    if modality == "cash":
        value = round(country.cash_per_person_usd * household_size, 2)
        return [{"item": "cash_transfer", "quantity": value, "unit": "USD"}]
    if modality == "voucher":
        value = round(country.cash_per_person_usd * household_size, 2)
        lines: list[dict[str, Any]] = [{"item": "cash_voucher", "quantity": value, "unit": "USD"}]
        if rand() < 0.4:
            lines.append({"item": "soap", "quantity": 2 * household_size, "unit": "piece"})
        return lines
    lines = [
        {"item": country.staple, "quantity": 12 * household_size, "unit": "kg"},
        {"item": "pulses", "quantity": round(1.5 * household_size, 1), "unit": "kg"},
        {"item": "vegetable_oil", "quantity": round(0.9 * household_size, 1), "unit": "l"},
    ]
    if rand() < 0.5:
        lines.append({"item": "salt", "quantity": round(0.15 * household_size, 2), "unit": "kg"})
    if rand() < 0.3:
        nfi = _pick(rng, _NFI_ITEMS)
        quantity = 2 * household_size if nfi == "soap" else 1 + int(rand() * 3)
        lines.append({"item": nfi, "quantity": quantity, "unit": ITEM_UNITS[nfi]})
    return lines


def _distribution(seed: int, index: int, beneficiary_count: int | None) -> dict[str, Any]:
    """Build one distribution event consistent with the beneficiary it references."""
    rng = _rng(seed, DISTRIBUTIONS, index)
    # Without an explicit population the reference is drawn from [0, index]: it depends on the
    # index alone (chunk-stable) and is always < start + count, so a beneficiaries dataset of
    # the same length satisfies every reference.  Early registrants receive more rounds.
    population = index + 1 if beneficiary_count is None else beneficiary_count
    beneficiary_index = int(rng.random() * population)
    place, registration_ord, household_size = _anchor(_rng(seed, BENEFICIARIES, beneficiary_index))
    country = _COUNTRIES[place.country]
    distribution_ord = registration_ord + int(rng.random() * (_ORD_MAX - registration_ord + 1))
    r = rng.random()
    in_kind, cash, _voucher = country.modality_weights
    modality = "in_kind" if r < in_kind else "cash" if r < in_kind + cash else "voucher"
    return {
        DISTRIBUTION_KEY: _distribution_id(seed, index),
        BENEFICIARY_KEY: _beneficiary_id(seed, beneficiary_index),
        "site": _pick(rng, _SITES[place.admin1]),
        "distribution_date": date.fromordinal(distribution_ord).isoformat(),
        "items": _items(rng, modality, country, household_size),
        "modality": modality,
        "distributed_by": f"STF-{place.country}-{1 + int(rng.random() * _STAFF_PER_COUNTRY):03d}",
    }


def _check_range(count: int, start: int) -> None:
    """Reject negative sizes eagerly, before a lazy iterator hides the mistake."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")


def beneficiaries(count: int, seed: int = 1, start: int = 0) -> Iterator[dict[str, Any]]:
    """Yield household registrations for indices ``start .. start + count - 1``.

    Lazy so that very large datasets stream in constant memory; arguments are validated now.
    """
    _check_range(count, start)
    return (_beneficiary(seed, index) for index in range(start, start + count))


def distributions(
    count: int,
    seed: int = 1,
    start: int = 0,
    beneficiary_count: int | None = None,
    rounds: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield distribution events for indices ``start .. start + count - 1``.

    Each references ``beneficiaries(...)`` of the same ``seed``.  With ``beneficiary_count`` the
    referenced index is uniform in ``[0, beneficiary_count)``.  Without it, record ``i`` refers
    to an index in ``[0, i]``; unlike a default tied to ``count`` this keeps every record
    independent of chunking, and a beneficiary set of ``start + count`` records (``count`` when
    ``start`` is 0) still contains every referenced beneficiary.

    ``rounds``: distributions happen on that many distribution days (weekly, the last one on
    DATE_MAX; record ``i`` on day ``i % rounds``), as a field office hands out rations in rounds
    rather than every day. What summaries per site and day are measured against; the date may
    then precede the beneficiary's registration.
    """
    _check_range(count, start)
    if beneficiary_count is not None and beneficiary_count <= 0:
        raise ValueError(f"beneficiary_count must be > 0, got {beneficiary_count}")
    if rounds is not None and rounds <= 0:
        raise ValueError(f"rounds must be > 0, got {rounds}")
    made = (_distribution(seed, index, beneficiary_count) for index in range(start, start + count))
    if rounds is None:
        return made
    return (
        record | {"distribution_date": date.fromordinal(_ORD_MAX - 7 * (i % rounds)).isoformat()}
        for i, record in enumerate(made, start=start)
    )


def records(collection: str, count: int, seed: int = 1, start: int = 0) -> Iterator[dict[str, Any]]:
    """Dispatch by collection name ("beneficiaries" / "distributions").

    Lets callers (CLI, loaders, benchmarks) be parameterised by collection name alone.
    Raises ValueError naming the collection otherwise.
    """
    if collection == BENEFICIARIES:
        return beneficiaries(count, seed=seed, start=start)
    if collection == DISTRIBUTIONS:
        return distributions(count, seed=seed, start=start)
    raise ValueError(f"unknown collection {collection!r}; expected one of {', '.join(COLLECTIONS)}")


def write_ndjson(path: Path | str, collection: str, count: int, seed: int = 1) -> int:
    """Write records as NDJSON (one compact JSON object per line), atomically; return count.

    Atomic (temp file in the same directory, fsync, rename) so a crash or a concurrent reader
    never sees a half-written dataset.  UTF-8 without ASCII escaping keeps names readable and
    sizes realistic.  The output is byte-identical for the same (collection, count, seed).
    """
    iterator = records(collection, count, seed=seed)  # validates before any file is created
    written = 0
    with atomic_write(path, mode=0o644, text=True) as handle:  # a dataset is meant to be shared
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        for record in iterator:
            handle.write(dumps(record))
            handle.write("\n")
            written += 1
    return written
