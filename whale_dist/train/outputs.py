"""What a finished run leaves in its folder besides Ray's checkpoints: metrics history (CSV), a training curve (PNG)
and the best checkpoint's encoder and species head exported as ``model.pt`` + ``model.json`` (what the embedder and
identify load); a final fit (no validation) exports its latest checkpoint.

The history comes from the latest checkpoint (it carries every epoch's metrics across worker restarts and re-runs),
so the CSV is complete even when the run was resumed from storage by a different driver process. Each row names the
version of that epoch's weights, so ``metrics.csv`` + ``model.json`` say which epoch a run exported: the epoch count
a final fit (``train.final_fit_from``) reads back.
"""

from __future__ import annotations

import io

from whale_dist import storage
from whale_dist.config import ConfigError

HISTORY_COLUMNS = ("epoch", "loss", "map5", "top1", "top5", "threshold", "images_per_s", "data_wait_share",
                   "lr_backbone", "version", "attempt_start")


def history_csv(history: list[dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame(history)
    return frame[[c for c in HISTORY_COLUMNS if c in frame.columns]].to_csv(index=False)


def curve_png(history: list[dict], title: str = "") -> bytes:
    """Loss (left axis) and validation MAP@5 (right axis) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [row["epoch"] for row in history]
    scored = [row for row in history if row.get("map5") is not None]  # a final fit validates nothing
    fig, left = plt.subplots(figsize=(6, 3.5), dpi=100)
    left.plot(epochs, [row["loss"] for row in history], "o-", color="tab:red", label="training loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss", color="tab:red")
    right = left.twinx()
    right.plot([r["epoch"] for r in scored], [r["map5"] for r in scored], "s-", color="tab:blue", label="val MAP@5")
    right.set_ylabel("validation MAP@5", color="tab:blue")
    right.set_ylim(0, 1)
    left.set_title(title or "training")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def best_checkpoint(result):
    """The kept checkpoint with the highest MAP@5 (latest on ties); falls back to the latest checkpoint."""
    scored = [(metrics.get("map5", -1.0), metrics.get("epoch", 0), ckpt) for ckpt, metrics in
              (result.best_checkpoints or [])]
    if scored:
        return max(scored, key=lambda item: (item[0], item[1]))[2]
    return result.checkpoint


def export_best(result, model_url: str):
    """Export the best checkpoint's encoder and species head with its card; returns the written ``ModelCard``."""
    from whale_dist.model import ModelCard, encoder_from_card, export_encoder  # torch, like the checkpoint module
    from whale_dist.train.checkpoint import load_checkpoint_card, load_state, part_state

    checkpoint = best_checkpoint(result)
    card = ModelCard(**load_checkpoint_card(checkpoint))
    encoder = encoder_from_card(card)
    state = load_state(checkpoint)["model"]
    encoder.load_state_dict(part_state(state, "encoder."))
    return export_encoder(encoder, card, model_url, species_head=part_state(state, "species_head."))


def exported_row(history: list[dict], version: str) -> dict | None:
    """The history row of the epoch whose weights have ``version`` (the exported one), latest if several."""
    return next((row for row in reversed(history) if row.get("version") == version), None)


def chosen_epoch(run_url: str) -> int:
    """The epoch a finished cross-validated run exported, from its ``model.json`` version and ``metrics.csv``."""
    import pandas as pd

    from whale_dist.model import load_card

    try:
        version = load_card(storage.join(run_url, "model.pt")).version
        history = pd.read_csv(io.StringIO(storage.read_text(storage.join(run_url, "metrics.csv"))))
    except FileNotFoundError as exc:
        raise ConfigError(f"config key 'train.final_fit_from': {storage.redact(run_url)} holds no finished run "
                          f"(model.json + metrics.csv): {exc}") from exc
    if "map5" not in history.columns:
        raise ConfigError(f"config key 'train.final_fit_from': {storage.redact(run_url)} is a final fit itself; "
                          "name the cross-validated run that chose its epochs")
    row = exported_row(history.to_dict("records"), version)
    if row is None:
        raise ConfigError(f"config key 'train.final_fit_from': no epoch of {storage.redact(run_url)}/metrics.csv "
                          f"has the exported version {version}; set train.epochs instead")
    return int(row["epoch"])


def write_outputs(result, run_url: str) -> dict:
    """metrics.csv, curve.png, model.pt/model.json in ``run_url``; returns a summary for the caller."""
    from whale_dist.train.checkpoint import load_state

    if result.checkpoint is None:
        raise RuntimeError(f"training run {storage.redact(run_url)} reported no checkpoint")
    history = load_state(result.checkpoint)["history"]
    storage.write_text(storage.join(run_url, "metrics.csv"), history_csv(history))
    storage.write_bytes(storage.join(run_url, "curve.png"), curve_png(history, run_url.rsplit("/", 1)[-1]))
    model_url = storage.join(run_url, "model.pt")
    card = export_best(result, model_url)
    best = exported_row(history, card.version)
    if best is None:
        raise RuntimeError(f"training run {storage.redact(run_url)}: the exported weights {card.version} are no "
                           "epoch of its history")
    return {"model_url": model_url, "version": card.version, "best_map5": best.get("map5"),
            "best_top1": best.get("top1"), "best_top5": best.get("top5"), "best_epoch": best["epoch"],
            "epochs": history[-1]["epoch"], "run_url": run_url, "history": history}
