"""Fast in-process harness for the demo survey (no Ray, no S3): ``configs/demo.yaml``'s model, loss, optimiser,
schedule and the library's ``train_epoch`` on the survey's photos decoded once, then the demo's own calibration and
identification code (``calibrate.calibrate_ranked``, ``ranking.rank_queries`` on an in-memory catalogue) on the test
split. One config check takes 1-3 CPU minutes instead of a whole ``make demo``; training is noisy (about +-0.05
MAP@5 between seeds), so compare configs over several ``--seed``s.

    PYTHONPATH=bench .venv/bin/python bench/demo_harness.py --seed 0 [key=value overrides of configs/demo.yaml]
    PYTHONPATH=bench .venv/bin/python bench/demo_harness.py --rescore /tmp/whale-harness/demo-emb-s0.npz

The model kept is the validation-best checkpoint, as ``run_training`` keeps it (validation every ``train.val_every``
epochs). ``--save`` writes the catalogue and test embeddings so that decision rules can be rescored without training.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch
from lions_harness import CACHE, MemoryShard, embed, images_of

from whale_dist import catalog, storage
from whale_dist.config import load_config
from whale_dist.identify.baselines import read_test_split


def survey(cfg) -> str:
    """The demo's survey (same synth settings), generated once into the cache."""
    from whale_dist.synth.survey import generate_survey

    folder = os.path.join(CACHE, f"demo-survey-s{cfg.synth.seed}")
    if not os.path.exists(os.path.join(folder, "survey.json")):
        generate_survey(cfg.synth, folder)
    return folder


def survey_tables(folder: str):
    """(catalogue, test) tables as the demo embeds them: with the manifests' encounter, date and location."""
    import pandas as pd

    frame, test = catalog.read_happywhale(folder, check=False), read_test_split(folder)
    extra = ["encounter_id", "date", "location"]
    for name, table in (("train", frame), ("test", test)):
        manifest = pd.read_csv(os.path.join(folder, f"{name}_manifest.csv")).fillna("")
        manifest["image"] = manifest["image"].str.split("/").str[-1]
        key = "image_key" if name == "train" else "image"
        table[extra] = table[[key]].merge(manifest, left_on=key, right_on="image", how="left")[extra].to_numpy()
    return frame, test


def memory_catalogue(frame, vectors: np.ndarray):
    """The published ``Catalogue`` over an exact in-memory index: identify's own search and aggregation."""
    import faiss
    import pandas as pd

    from whale_dist.index import Catalogue

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.arange(len(vectors), dtype=np.int64))
    metadata = pd.DataFrame({"id": np.arange(len(frame)), "image_key": list(frame["image_key"]),
                             "individual_id": list(frame["individual_id"]), "url": list(frame["url"]),
                             "species": list(frame["species"]), "encounter_id": list(frame["encounter_id"]),
                             "date": list(frame["date"]), "location": list(frame["location"])})
    manifest = {"model_version": "harness", "dim": vectors.shape[1], "index_key": "Flat", "version": "0"}
    return Catalogue("memory://harness", manifest, metadata, [index])


def score(cfg, frame, test, catalogue_vectors, test_vectors, held=None) -> dict:
    """The demo's calibrate -> identify -> evaluate on these embeddings (no pixels baseline), calibrated on the
    individuals training left out (``held``; the seeded choice when None). Per-species thresholds key on the top
    candidate's species: the harness exports no model whose species head identify would read."""
    from whale_dist.identify.calibrate import calibrate_ranked
    from whale_dist.identify.ranking import predict, rank_queries
    from whale_dist.metrics import evaluate_predictions
    from whale_dist.protocol import catalogue_queries

    c = cfg.catalogue
    truths, ranked = catalogue_queries(catalogue_vectors, list(frame["individual_id"]), c.new_fraction, c.seed,
                                       encounters=list(frame["encounter_id"]), species=list(frame["species"]),
                                       held=held)
    calibration = calibrate_ranked(truths, ranked, cfg.identify.min_species_queries)
    ranked = rank_queries(memory_catalogue(frame, catalogue_vectors), test_vectors, test, cfg.identify)
    predictions, _ = predict(ranked, calibration, cfg.identify.k, cfg.identify.per_species_threshold)
    scores = evaluate_predictions(list(test["individual_id"]), predictions)
    return {k: round(float(v), 4) for k, v in {**scores, "threshold": calibration["global"],
                                               "calibration_map5": calibration["map5_global"]}.items()}


def train(cfg, frame, images: np.ndarray, threads: int) -> tuple[torch.nn.Module, list, list | None]:
    """Train on the fold's training photos, split as the training app splits them (``train.job.training_split``:
    calibration's new animals left out); returns the encoder of the validation-best epoch, the history and the
    individuals left out."""
    from whale_dist.model import create_model
    from whale_dist.train.job import training_split
    from whale_dist.train.loop import build_optimizer, freeze_unused, lr_factor, train_epoch
    from whale_dist.train.validate import evaluate

    torch.set_num_threads(threads)
    frame = frame.assign(row=np.arange(len(frame)))
    fold_train, val, held = training_split(frame, cfg)
    individuals, species = catalog.label_maps(fold_train)
    counts = fold_train["individual_id"].value_counts()
    torch.manual_seed(cfg.train.seed)
    net = create_model(cfg, [int(counts[n]) for n in individuals], len(species))
    freeze_unused(net, cfg.model.image_size)
    batch_size = max(2, min(cfg.train.batch_size, len(fold_train)))
    steps = max(1, len(fold_train) // batch_size)
    optimizer = build_optimizer(net, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, max(1, int(cfg.train.warmup_epochs * steps)), steps * cfg.train.epochs))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rows = fold_train["row"].to_numpy()
    labels = np.array([individuals[i] for i in fold_train["individual_id"]], np.int64)
    kinds = np.array([species.get(s, -1) for s in fold_train["species"]], np.int64)
    shard = MemoryShard(images[rows], labels, kinds, cfg.train.augment, cfg.model.image_size, cfg.train.seed,
                        cfg.train.augment_colour)
    history, best, started = [], None, time.time()
    for epoch in range(1, cfg.train.epochs + 1):
        stats = train_epoch(net, optimizer, scheduler, scaler, shard, batch_size, cfg.train.grad_clip, None,
                            cfg.train.freeze_bn)
        if epoch % max(1, cfg.train.val_every) and epoch < cfg.train.epochs:
            continue
        val_map5 = evaluate(embed(net.encoder, images[val["row"].to_numpy()]), list(val["label"]),
                            embed(net.encoder, images[rows]), list(fold_train["individual_id"]),
                            new_fraction=cfg.catalogue.new_fraction)["map5"]
        history.append({"epoch": epoch, "loss": round(stats["loss"], 3), "val": round(val_map5, 4),
                        "s": round(time.time() - started)})
        print(json.dumps(history[-1]), flush=True)
        if best is None or val_map5 > best[0]:
            best = (val_map5, copy.deepcopy(net.encoder.state_dict()))
    net.encoder.load_state_dict(best[1])
    return net.encoder, history, held


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0, help="train.seed (the survey stays synth.seed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", default="", help="write catalogue/test embeddings to this .npz")
    parser.add_argument("--rescore", default="", help="score saved embeddings instead of training")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    weights = os.path.join(CACHE, "tf_efficientnet_lite0.safetensors")
    cfg = load_config("configs/demo.yaml", ["root=/tmp/unused", f"model.backbone_weights={weights}",
                                            f"train.seed={args.seed}", *args.overrides])
    folder = survey(cfg)
    frame, test = survey_tables(folder)
    if args.rescore:
        saved = np.load(args.rescore)
        print(json.dumps({"rescore": args.rescore, **score(cfg, frame, test, saved["catalogue"], saved["test"])}))
        return
    if not os.path.exists(weights):
        from whale_dist import pretrained

        pretrained.write_efficientnet_lite0_weights(weights)
    size, started = cfg.model.image_size, time.time()
    images = images_of([storage.strip_scheme(u) for u in frame["url"]], size)
    encoder, history, held = train(cfg, frame, images, args.threads)
    catalogue_vectors = embed(encoder, images, cfg.embed.flip_tta)
    test_vectors = embed(encoder, images_of([storage.strip_scheme(u) for u in test["url"]], size), cfg.embed.flip_tta)
    if args.save:
        np.savez(args.save, catalogue=catalogue_vectors, test=test_vectors)
    scores = score(cfg, frame, test, catalogue_vectors, test_vectors, held)
    print(json.dumps({"summary": True, "seed": args.seed, "overrides": args.overrides, "history": history, **scores,
                      "s": round(time.time() - started)}), flush=True)


if __name__ == "__main__":
    main()
