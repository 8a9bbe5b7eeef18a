"""Synthetic survey (``whale-dist synth --out URL --seed N``): a Happywhale-layout catalogue drawn from a seed.

The survey has the statistics that make photo-ID hard: several species, a long tail of photos per individual with
many singletons, sightings grouped in encounters, and a test split with individuals never seen in training (truth
``new_individual``). Every file is a pure function of the config, byte for byte, so tests and benchmarks can compare
runs; nothing written depends on the output location or the clock. Layout: see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import dataclasses

from whale_dist import storage
from whale_dist.catalog import NEW_INDIVIDUAL
from whale_dist.synth.draw import draw_individual
from whale_dist.synth.photo import photo_conditions, render_photo
from whale_dist.synth.plan import plan_survey


def draw_photos(cfg, rows: list[dict]):
    """Yield (row, jpeg bytes); the template is drawn once per individual, everything else once per photo.

    Sea and light are drawn per photo, not per encounter: training photos of one encounter sharing a sea would teach
    a small model to recognise the encounter, a cue no test photo (always a new encounter) carries.
    """
    import numpy as np
    from PIL import Image

    templates: dict[int, Image.Image] = {}
    for index, row in enumerate(rows):
        ind = row["individual"]
        if ind not in templates:
            picture = draw_individual(row["species"], 2 * cfg.image_size, np.random.default_rng([cfg.seed, 1, ind]))
            templates[ind] = Image.fromarray(picture, mode="RGBA")
        rng = np.random.default_rng([cfg.seed, 2, index])
        yield row, render_photo(templates[ind], cfg.image_size, rng, photo_conditions(rng))


def _csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    """CSV text with '\\n' line ends and a fixed column order: identical bytes on every platform."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[row[c] for c in columns] for row in rows])
    return buffer.getvalue()


def write_tables(rows: list[dict], out_url: str) -> None:
    """train.csv, the two generic manifests, test_labels.csv and sample_submission.csv (the Kaggle layout: with
    train_images/ and test_images/ the folder is a Happywhale download); rows sorted by image name like Happywhale's."""
    train = sorted((r for r in rows if r["split"] == "train"), key=lambda r: r["image"])
    test = sorted((r for r in rows if r["split"] == "test"), key=lambda r: r["image"])
    known = {r["individual_id"] for r in train}
    meta = ("encounter_id", "date", "location")
    storage.write_text(storage.join(out_url, "train.csv"), _csv(train, ("image", "species", "individual_id")))
    train_manifest = [{**r, "image": f"train_images/{r['image']}"} for r in train]
    storage.write_text(storage.join(out_url, "train_manifest.csv"),
                       _csv(train_manifest, ("image", "individual_id", "species", *meta)))
    test_manifest = [{**r, "image": f"test_images/{r['image']}"} for r in test]
    storage.write_text(storage.join(out_url, "test_manifest.csv"), _csv(test_manifest, ("image", *meta)))
    labels = [{**r, "individual_id": r["individual_id"] if r["individual_id"] in known else NEW_INDIVIDUAL}
              for r in test]
    storage.write_text(storage.join(out_url, "test_labels.csv"), _csv(labels, ("image", "species", "individual_id")))
    storage.write_text(storage.join(out_url, "sample_submission.csv"), sample_submission(train, test))


def sample_submission(train: list[dict], test: list[dict]) -> str:
    """Kaggle's ``sample_submission.csv``: every test image with the same five placeholder ids (``new_individual``
    and the four most photographed individuals, ties by id), the shape a submission must have."""
    from collections import Counter

    counts = Counter(r["individual_id"] for r in train)
    top = sorted(counts, key=lambda name: (-counts[name], name))[:4]
    guess = " ".join([NEW_INDIVIDUAL, *top])
    return _csv([{"image": r["image"], "predictions": guess} for r in test], ("image", "predictions"))


def survey_statistics(cfg, rows: list[dict]) -> dict:
    """What survey.json states, computed from the plan (the tests recompute it from the written CSVs)."""
    from collections import Counter

    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    per_individual = Counter(r["individual_id"] for r in train)
    new = [r for r in test if r["individual_id"] not in per_individual]
    species = {name: {"photos": sum(1 for r in train if r["species"] == name),
                      "individuals": len({r["individual_id"] for r in train if r["species"] == name})}
               for name in sorted({r["species"] for r in train})}
    return {"seed": cfg.seed, "image_size": cfg.image_size, "photos": len(train), "individuals": len(per_individual),
            "singletons": sum(1 for n in per_individual.values() if n == 1),
            "max_photos_per_individual": max(per_individual.values()),
            "encounters": len({r["encounter_id"] for r in train}), "species": species,
            "test_photos": len(test), "test_new_photos": len(new),
            "test_new_individuals": len({r["individual_id"] for r in new}),
            "test_new_fraction": round(len(new) / max(1, len(test)), 4)}


def generate_survey(synth_cfg, out_url: str) -> dict:
    """Draw and write the whole survey at ``out_url`` (local or s3://); returns the statistics in survey.json."""
    import yaml

    rows = plan_survey(synth_cfg)
    for row, jpeg in draw_photos(synth_cfg, rows):
        storage.write_bytes(storage.join(out_url, f"{row['split']}_images", row["image"]), jpeg)
    write_tables(rows, out_url)
    stats = survey_statistics(synth_cfg, rows)
    settings = {**dataclasses.asdict(synth_cfg), "out": ""}  # the location is not part of what was generated
    storage.write_text(storage.join(out_url, "synth_config.yaml"), yaml.safe_dump(settings, sort_keys=True))
    storage.write_json(storage.join(out_url, "survey.json"), stats)
    return stats
