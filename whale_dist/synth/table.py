"""A catalogue table of the Happywhale shape without photos: for benchmarks and tests of whatever reads only the
table (``whale-dist stats``, catalogue splitting) at the real scale, 51,033 rows, in a second.

Shape of the Kaggle ``train.csv`` (Happywhale, 2022): 51,033 photos of 15,587 individuals, 9,258 of them singletons,
30 species names of which five are the typos and synonyms ``catalog.SPECIES_FIXES`` repairs; the species weights
below are the competition's photo counts per raw name.
"""

from __future__ import annotations

HAPPYWHALE_SPECIES = {
    "bottlenose_dolphin": 9664, "beluga": 7443, "humpback_whale": 7392, "blue_whale": 4830,
    "false_killer_whale": 3326, "dusky_dolphin": 3139, "spinner_dolphin": 1700, "melon_headed_whale": 1689,
    "minke_whale": 1608, "killer_whale": 962, "fin_whale": 1324, "gray_whale": 1123, "bottlenose_dolpin": 1117,
    "kiler_whale": 2455, "southern_right_whale": 866, "spotted_dolphin": 490, "sei_whale": 428,
    "short_finned_pilot_whale": 367, "common_dolphin": 347, "cuviers_beaked_whale": 341, "pilot_whale": 262,
    "long_finned_pilot_whale": 238, "white_sided_dolphin": 229, "brydes_whale": 154, "pantropic_spotted_dolphin": 145,
    "globis": 116, "commersons_dolphin": 90, "pygmy_killer_whale": 76, "rough_toothed_dolphin": 60,
    "frasiers_dolphin": 14,
}
INDIVIDUALS_PER_PHOTO = 15587 / 51033
SINGLETON_SHARE = 9258 / 15587


def photo_counts(n_photos: int, rng):
    """Photos per individual summing to ``n_photos``: the real share of singletons, a Zipf tail for the rest."""
    import numpy as np

    n_ind = max(1, round(n_photos * INDIVIDUALS_PER_PHOTO))
    counts = np.ones(n_ind, dtype=np.int64)
    multi = rng.permutation(n_ind)[: round(n_ind * (1 - SINGLETON_SHARE))]
    counts[multi] = np.minimum(400, 2 + rng.zipf(1.8, size=len(multi)))
    while len(multi) and counts.sum() != n_photos:
        diff = int(n_photos - counts.sum())
        if diff > 0:
            counts[multi] += np.bincount(rng.choice(len(multi), size=diff), minlength=len(multi))
        else:
            big = multi[counts[multi] > 2]
            counts[rng.choice(big, size=min(-diff, len(big)), replace=False)] -= 1
    return counts


def kaggle_table(n_photos: int = 51033, seed: int = 0) -> list[dict]:
    """Rows ``image, species, individual_id`` sorted by image name, like the Kaggle ``train.csv``."""
    import numpy as np

    rng = np.random.default_rng([seed, 17])
    counts = photo_counts(n_photos, rng)
    names = list(HAPPYWHALE_SPECIES)
    weights = np.array([HAPPYWHALE_SPECIES[n] for n in names], dtype=float)
    species = rng.choice(len(names), size=len(counts), p=weights / weights.sum())
    ids = [f"{v:012x}" for v in rng.choice(16**12, size=len(counts), replace=False)]
    images = [f"{v:014x}.jpg" for v in rng.choice(2**53, size=int(counts.sum()), replace=False)]
    owner = np.repeat(np.arange(len(counts)), counts)
    rows = [{"image": image, "species": names[species[i]], "individual_id": ids[i]} for image, i in zip(images, owner)]
    return sorted(rows, key=lambda r: r["image"])
