"""Ranking on hand-written hits (ties, encounters, new_individual), calibration, and identify end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from whale_dist.identify.ranking import combine_encounters, predict, predictions_table, rank_hits, submission_csv

NEW = "new_individual"


def hits_frame(rows):
    """rows: (query, individual, score[, species]) -> a hits table with made-up match photos."""
    return pd.DataFrame([{"query": r[0], "individual_id": r[1], "score": r[2], "match_key": f"{r[1]}-{r[0]}.jpg",
                          "match_url": f"s3://b/{r[1]}-{r[0]}.jpg", "species": r[3] if len(r) > 3 else "orca"}
                         for r in rows])


def test_rank_sorts_by_score_and_breaks_ties_by_id():
    hits = hits_frame([(0, "b", 0.5), (0, "a", 0.5), (0, "c", 0.9), (0, "d", 0.1), (1, "z", 0.3)])
    ranked = rank_hits(hits, n_queries=3, k=3)
    assert ranked["ids"].tolist() == [["c", "a", "b"], ["z"], []]
    assert ranked["scores"][0] == [0.9, 0.5, 0.5]
    assert ranked["match_keys"][0][0] == "c-0.jpg"


def test_rank_keeps_one_row_per_individual():
    hits = hits_frame([(0, "a", 0.4), (0, "a", 0.8), (0, "b", 0.6)])
    assert rank_hits(hits, 1, 5)["ids"][0] == ["a", "b"]
    assert rank_hits(hits, 1, 5)["scores"][0] == [0.8, 0.6]


def test_encounter_pools_best_similarity_per_individual():
    # photos 0 and 1 are one encounter (left and right flank); photo 2 is alone
    hits = hits_frame([(0, "a", 0.9), (0, "b", 0.2), (1, "a", 0.3), (1, "b", 0.7), (1, "c", 0.5), (2, "a", 0.6)])
    pooled = combine_encounters(hits, ["enc1", "enc1", ""])
    ranked = rank_hits(pooled, 3, 5)
    assert ranked["ids"][0] == ranked["ids"][1] == ["a", "b", "c"]
    assert ranked["scores"][1] == [0.9, 0.7, 0.5]
    assert ranked["match_keys"][1][0] == "a-0.jpg"  # the evidence is the photo that matched best
    assert ranked["ids"][2] == ["a"]
    assert rank_hits(combine_encounters(hits, ["", "", ""]), 3, 5)["ids"][0] == ["a", "b"]


def test_predict_inserts_new_individual_per_species_threshold():
    hits = hits_frame([(0, "a", 0.9, "orca"), (0, "b", 0.5, "orca"),
                       (1, "c", 0.7, "beluga"), (1, "d", 0.6, "beluga"), (2, "e", 0.3, "humpback")])
    ranked = rank_hits(hits, 3, 5)
    calibration = {"global": 0.4, "per_species": {"orca": 0.95, "beluga": 0.65}}
    predictions, thresholds = predict(ranked, calibration)
    assert predictions == [[NEW, "a", "b"], ["c", NEW, "d"], ["new_individual", "e"]]
    assert thresholds == [0.95, 0.65, 0.4]
    predictions, _ = predict(ranked, calibration, per_species=False)
    assert predictions[0] == ["a", "b", NEW]


def test_predictions_table_and_submission():
    hits = hits_frame([(0, "a", 0.9), (0, "b", 0.5)])
    ranked = rank_hits(hits, 2, 5)
    queries = pd.DataFrame({"image_key": ["q,1.jpg", "q2.jpg"], "url": ["s3://b/q,1.jpg", "s3://b/q2.jpg"],
                            "encounter_id": ["", ""]})
    predictions, thresholds = predict(ranked, {"global": 0.7})
    table = predictions_table(queries, ranked, predictions, thresholds)
    assert table["predictions"][0] == ["a", NEW, "b"]
    assert table["scores"][0] == [0.9, 0.7, 0.5]
    assert table["match_keys"][0] == ["a-0.jpg", "", "b-0.jpg"]
    assert table["predictions"][1] == [NEW]  # no candidate at all: only new_individual can be proposed
    csv = submission_csv(table).splitlines()
    assert csv == ["image,predictions", '"q,1.jpg",a new_individual b', "q2.jpg,new_individual"]


def test_calibration_picks_the_threshold_that_separates_known_from_new():
    """Orcas match at >= 0.8 but new orcas reach 0.6; belugas match at 0.45-0.49 and new ones stay <= 0.3."""
    from whale_dist.identify.calibrate import calibrate_ranked

    rows, truths = [], []
    for q in range(40):
        orca, known = q < 20, q % 2 == 0
        high, low = (0.8 + 0.005 * q, 0.6 - 0.005 * q) if orca else (0.45 + 0.002 * (q - 20), 0.3 - 0.005 * q)
        score = high if known else low
        rows += [(q, f"ind{q}", score, "orca" if orca else "beluga"), (q, "other", score - 0.2, "orca")]
        truths.append(f"ind{q}" if known else NEW)
    ranked = rank_hits(hits_frame(rows), 40, 5)
    calibration = calibrate_ranked(truths, ranked, min_species_queries=10)
    assert 0.6 < calibration["per_species"]["orca"] <= 0.8  # between the new and the known orcas' scores
    assert 0.3 - 0.1 < calibration["per_species"]["beluga"] <= 0.45
    assert calibration["map5_per_species"] == pytest.approx(1.0)
    assert calibration["map5_global"] < 1.0  # one global threshold cannot separate both species
    assert calibration["n_new"] == 20 and len(calibration["curve"]["map5"]) == len(calibration["curve"]["thresholds"])
    few = calibrate_ranked(truths, ranked, min_species_queries=25)
    assert few["per_species"] == {}


def test_calibration_of_another_model_is_refused(tmp_path):
    from whale_dist.config import ConfigError
    from whale_dist.identify.calibrate import load_calibration, save_calibration

    with pytest.raises(ConfigError, match="no calibration"):
        load_calibration(str(tmp_path), "m1")
    save_calibration(str(tmp_path), {"global": 0.5, "per_species": {}, "model_version": "m1"})
    assert load_calibration(str(tmp_path), "m1")["global"] == 0.5
    with pytest.raises(ConfigError, match="calibrate` again"):
        load_calibration(str(tmp_path), "m2")


# --- end to end on loopback S3: embed the catalogue, index, calibrate, identify, evaluate -------------------------

EVIL_ID = "<script>alert('id')</script>"
EVIL_KEY = "../../<script>q</script>.jpg"


def tiny_survey(survey: str) -> dict[str, str]:
    """A synthetic survey whose first individual is renamed ``EVIL_ID``; returns {old id: new id}."""
    from whale_dist import storage
    from whale_dist.config import SynthConfig
    from whale_dist.synth.survey import generate_survey

    generate_survey(SynthConfig(n_individuals=8, image_size=64, max_photos_per_individual=4, test_photos=6), survey)
    train = storage.read_text(storage.join(survey, "train.csv"))
    victim = train.splitlines()[1].split(",")[2]
    for name in ("train.csv", "train_manifest.csv"):
        text = storage.read_text(storage.join(survey, name))
        storage.write_text(storage.join(survey, name), text.replace(victim, '"' + EVIL_ID + '"'))
    return {victim: EVIL_ID}


def query_manifest(survey: str, renamed: dict[str, str]) -> tuple[str, str]:
    """Test photos + a missing file, the first keyed ``EVIL_KEY``; returns (manifest URL, labels URL)."""
    import csv
    import io

    from whale_dist import storage

    labels = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(survey, "test_labels.csv")))))
    manifest, truth = io.StringIO(), io.StringIO()
    rows = [(f"test_images/{r['image']}", EVIL_KEY if i == 0 else r["image"], renamed.get(r["individual_id"],
             r["individual_id"])) for i, r in enumerate(labels)] + [("test_images/missing.jpg", "missing.jpg", NEW)]
    csv.writer(manifest).writerows([("image", "image_key", "encounter_id")] + [(a, b, "") for a, b, _ in rows])
    csv.writer(truth).writerows([("image", "individual_id")] + [(b, c) for _, b, c in rows])
    storage.write_text(storage.join(survey, "query.csv"), manifest.getvalue())
    storage.write_text(storage.join(survey, "query_labels.csv"), truth.getvalue())
    return storage.join(survey, "query.csv"), storage.join(survey, "query_labels.csv")


def all_outputs(root: str, local: str) -> dict[str, bytes]:
    from pathlib import Path

    from whale_dist import storage

    found = {url: storage.read_bytes(url) for url in storage.list_files(root)}
    found.update({str(p): p.read_bytes() for p in Path(local).rglob("*") if p.is_file()})
    return found


@pytest.mark.slow
def test_identify_end_to_end_on_loopback_s3(ray_cluster, s3_bucket, tmp_path):
    import io

    from conftest import TEST_SECRET
    from helpers import make_model

    from whale_dist import embed, identify, index, storage
    from whale_dist.config import load_config

    survey, root, local = f"{s3_bucket}/survey", f"{s3_bucket}/store", str(tmp_path / "local")
    renamed = tiny_survey(survey)
    images, labels = query_manifest(survey, renamed)
    cfg = load_config(None, [f"root={root}", f"catalogue.url={survey}", "catalogue.n_folds=2", "train.run_name=t",
                             "index.catalogue_name=t", "embed.batch_size=8", "embed.actor_num_cpus=0.25",
                             "identify.min_species_queries=2", f"identify.local_copy={local}"])
    make_model(cfg.model_url)
    embed.embed_source(storage.join(survey, "train_manifest.csv"), cfg.embed_out, cfg.model_url, cfg.embed)
    index.build_index(cfg)
    calibration = identify.run_calibration(cfg)
    assert storage.exists(storage.join(cfg.identify_catalogue, "calibration.json"))
    assert 0.0 <= calibration["map5_global"] <= 1.0

    argv = ["--images", images, f"root={root}", f"catalogue.url={survey}", "catalogue.n_folds=2", "train.run_name=t",
            "index.catalogue_name=t", "embed.batch_size=8", "embed.actor_num_cpus=0.25", f"identify.local_copy={local}"]
    assert identify.main(argv) == 0
    out = cfg.identify_out
    table = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(out, "predictions.parquet"))))
    assert len(table) == 7 and {EVIL_KEY, "missing.jpg"} <= set(table["image"])
    failed = table[table["error"] != ""]
    assert list(failed["image"]) == ["missing.jpg"] and failed["error"].iloc[0].startswith("read")
    ok = table[table["error"] == ""]
    assert all(len(p) == 5 or (NEW in list(p) and len(p) <= 5) for p in ok["predictions"])
    submission = storage.read_text(storage.join(out, "submission.csv")).splitlines()
    assert submission[0] == "image,predictions" and len(submission) == len(table) + 1

    evaluation = identify.run_evaluation(cfg, labels)
    assert list(evaluation["rows"]["method"]) == ["model", "raw-pixel nearest neighbours", "random"]
    page = storage.read_text(storage.join(out, "report", "index.html"))
    assert "&lt;script&gt;q&lt;/script&gt;" in page and "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;id&#x27;)" in page  # the renamed individual is a candidate somewhere
    assert "Photos that could not be processed (1)" in page
    outputs = all_outputs(root, local)
    assert any(name.endswith("report/index.html") for name in outputs)
    assert not [name for name in outputs if ".." in name or "<" in name]
    assert not [name for name, data in outputs.items() if TEST_SECRET.encode() in data]


def test_truths_align_by_key_then_file_name(tmp_path):
    from whale_dist.config import ConfigError
    from whale_dist.identify.evaluate import align_truths, read_labels

    (tmp_path / "labels.csv").write_text("image,species,individual_id\na.jpg,orca,ind1\nb.jpg,orca,new_individual\n")
    labels = read_labels(str(tmp_path / "labels.csv"))
    assert align_truths(["test_images/a.jpg", "b.jpg"], labels) == ["ind1", NEW]
    with pytest.raises(ConfigError, match="1 predicted images have no label"):
        align_truths(["c.jpg"], labels)


class FakeCatalogue:
    """Brute-force stand-in for ``index.Catalogue`` (same aggregation and filters), for tests without Ray."""

    def __init__(self, metadata, vectors, model_version="mfake"):
        self.metadata, self.vectors, self.model_version = metadata.reset_index(drop=True), vectors, model_version

    def individuals(self, embeddings, k=5, filters=None):
        from whale_dist.index import aggregate_individuals, filter_mask

        scores = embeddings @ self.vectors.T
        scores[:, ~filter_mask(self.metadata, filters)] = -np.inf
        order = np.argsort(-scores, axis=1)
        ids = np.where(np.isfinite(np.take_along_axis(scores, order, 1)), order, -1)
        return aggregate_individuals(ids, np.take_along_axis(scores, order, 1), self.metadata, k)


def unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_identify_and_evaluate_commands_without_ray(tmp_path, monkeypatch):
    """The command path (thresholds, ranking, outputs, report, evaluation with baselines) on a local survey."""
    from whale_dist import storage
    from whale_dist.catalog import read_happywhale, read_manifest
    from whale_dist.config import SynthConfig
    from whale_dist.identify import job as identify
    from whale_dist.identify.calibrate import save_calibration
    from whale_dist.identify.evaluate import evaluate_main
    from whale_dist.synth.survey import generate_survey

    survey, root = str(tmp_path / "survey"), str(tmp_path / "store")
    generate_survey(SynthConfig(n_individuals=8, image_size=64, max_photos_per_individual=4, test_photos=6), survey)
    catalogue_table = read_happywhale(survey)
    rng = np.random.default_rng(0)
    centre = {i: rng.normal(size=16) for i in sorted(set(catalogue_table["individual_id"]))}
    vectors = unit(np.stack([centre[i] + 0.1 * rng.normal(size=16) for i in catalogue_table["individual_id"]]))
    queries = read_manifest(storage.join(survey, "test_manifest.csv"))
    truth = pd.read_csv(storage.join(survey, "test_labels.csv"), dtype=str)["individual_id"]
    query_vectors = unit(np.stack([centre[t] + 0.1 * rng.normal(size=16) if t in centre else rng.normal(size=16)
                                   for t in truth]))
    errors = pd.DataFrame({"image_key": queries["image_key"].iloc[-1:], "url": queries["url"].iloc[-1:],
                           "stage": ["decode"], "message": ["not a <JPEG>"]})  # the last photo failed
    monkeypatch.setattr(identify, "open_catalogue", lambda url, use_gpu=False: FakeCatalogue(catalogue_table, vectors))
    monkeypatch.setattr(identify, "embed_queries", lambda cfg, version: (queries.iloc[:-1], query_vectors[:-1],
                                                                         errors))
    argv = ["--images", "unused", f"root={root}", f"catalogue.url={survey}", f"identify.local_copy={tmp_path}/local"]
    save_calibration(storage.join(root, "indexes", "default"), {"global": 0.7, "per_species": {},
                                                                "model_version": "mfake"})
    assert identify.main(argv) == 0
    out = storage.join(root, "identify", "default")
    table = pd.read_parquet(storage.join(out, "predictions.parquet"))
    assert len(table) == len(queries) and table["error"].iloc[-1] == "decode: not a <JPEG>"
    assert (tmp_path / "local" / "report" / "index.html").exists()
    assert evaluate_main(argv[2:]) == 0  # labels default to {catalogue.url}/test_labels.csv
    rows = pd.read_csv(storage.join(out, "evaluation.csv")).set_index("method")
    assert rows.loc["model", "map5"] > rows.loc["random", "map5"]
    assert rows.loc["model", "map5"] > 0.8  # separable embeddings and a sensible threshold
    page = (tmp_path / "local" / "report" / "index.html").read_text()
    assert "Evaluation on labelled queries" in page and "not a &lt;JPEG&gt;" in page
