"""Who is photographed when: the synthetic survey's individuals, species, photo counts, encounters and splits.

The plan carries the statistics that make photo-ID hard: a long tail of photos per individual with many singletons
(Happywhale: 15.6k individuals, 51k photos, about a third seen once), sightings grouped in encounters (one date, one
place, several photos), and a test split in which some individuals were never catalogued. It is drawn from its own
seeded stream, so changing how photos are drawn never changes who is in the survey.
"""

from __future__ import annotations

import datetime

from whale_dist.synth.draw import SPECIES

LOCATIONS = {
    "fluke": ("hawaii", "gulf_of_maine", "southeast_alaska", "baja_california"),
    "dorsal": ("moray_firth", "sarasota_bay", "salish_sea", "shark_bay"),
    "flank": ("cook_inlet", "st_lawrence_estuary", "kona_coast"),
}
TRAIN_DATES, TEST_DATES = (datetime.date(2018, 1, 1), 1461), (datetime.date(2022, 1, 1), 365)


def _hex_names(rng, count: int, digits: int, taken: set[str]) -> list[str]:
    """Random hex ids like Happywhale's (``00021adfb725ed``), unique within the survey."""
    names = []
    while len(names) < count:
        name = f"{int(rng.integers(0, 16**digits - 1)):0{digits}x}"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _photo_counts(cfg, rng, n_train: int):
    """Long-tailed photos per training individual: a share of singletons, the rest Zipf-like up to the cap."""
    import numpy as np

    counts = np.minimum(cfg.max_photos_per_individual, 1 + rng.zipf(1.6, size=n_train))
    singles = rng.permutation(n_train)[: int(round(cfg.singleton_fraction * n_train))]
    counts[singles] = 1
    return counts


def _test_counts(cfg, rng, train_counts, n_new: int):
    """Test photos per individual: known ones resighted in proportion to their catalogue size, new ones 1+ each."""
    import numpy as np

    n_new_photos = int(round(cfg.test_photos * cfg.test_new_fraction)) if n_new else 0
    known = np.bincount(rng.choice(len(train_counts), size=cfg.test_photos - n_new_photos,
                                   p=train_counts / train_counts.sum()), minlength=len(train_counts))
    new = np.ones(n_new, dtype=int)
    new += np.bincount(rng.integers(0, n_new, size=max(0, n_new_photos - n_new)), minlength=n_new) if n_new else 0
    return np.concatenate([known, new])


def plan_survey(cfg) -> list[dict]:
    """Every photo to draw, as rows (split, image, individual, species, encounter, date, location, seed)."""
    import numpy as np

    rng = np.random.default_rng([cfg.seed, 0])
    n_new_photos = int(round(cfg.test_photos * cfg.test_new_fraction))
    n_new = min(max(1, int(round(n_new_photos * 0.7))) if n_new_photos else 0, cfg.n_individuals - 2)
    n_train = cfg.n_individuals - n_new
    names = list(SPECIES)
    weights = np.array([SPECIES[s][3] for s in names])
    species = [names[i] for i in rng.choice(len(names), size=cfg.n_individuals, p=weights / weights.sum())]
    taken: set[str] = set()
    ids = _hex_names(rng, cfg.n_individuals, 12, taken)
    train_counts = _photo_counts(cfg, rng, n_train)
    plan = {"train": [0] * cfg.n_individuals, "test": list(_test_counts(cfg, rng, train_counts, n_new))}
    plan["train"][:n_train] = list(train_counts)
    rows: list[dict] = []
    for split in ("train", "test"):
        for ind in range(cfg.n_individuals):
            rows += _encounters(rng, split, ind, ids[ind], species[ind], int(plan[split][ind]), len(rows))
    for row, image in zip(rows, _hex_names(rng, len(rows), 14, taken), strict=True):
        row["image"] = f"{image}.jpg"
    return rows


def _encounters(rng, split: str, ind: int, individual_id: str, species: str, count: int, first: int) -> list[dict]:
    """Group one individual's photos of one split into encounters of 1-4 photos sharing a date and place."""

    rows, remaining = [], count
    start, days = TRAIN_DATES if split == "train" else TEST_DATES
    places = LOCATIONS[SPECIES[species][0]]
    home = places[ind % len(places)]
    while remaining > 0:
        size = min(remaining, int(rng.integers(1, 5)))
        date = (start + datetime.timedelta(days=int(rng.integers(0, days)))).isoformat()
        place = home if rng.random() < 0.85 else places[int(rng.integers(len(places)))]
        encounter = f"{split}-{ind:05d}-{first + len(rows):06d}"
        rows += [{"split": split, "individual": ind, "individual_id": individual_id, "species": species,
                  "encounter_id": encounter, "date": date, "location": place} for _ in range(size)]
        remaining -= size
    return rows
