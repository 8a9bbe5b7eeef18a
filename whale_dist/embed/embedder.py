"""``Embedder``: decoded photos -> L2-normalised float32 embeddings, a plain callable with no Ray in it.

It loads the model once and maps a batch of decoded photos to embeddings; it is the Ray Data actor of the nightly
pipeline *and* what identification and GPU checks call directly, so every embedding in the system comes from the
same code. torch is imported inside the methods: the actor's process pays for it, the driver does not.
"""

from __future__ import annotations

import numpy as np

from whale_dist.embed.gpu_decode import decode_on_device
from whale_dist.failpoints import failpoint


class Embedder:
    """Decoded photos -> embeddings with the exported model at ``model_url``.

    ``autocast`` (bfloat16) applies on CUDA only: on CPU it would make the results depend on the device. With
    ``flip_tta`` the embedding is the normalised sum of the photo's and its mirror image's embeddings.
    """

    def __init__(self, model_url: str, device: str = "cpu", autocast: bool = True, flip_tta: bool = False,
                 threads: int = 0, batch_size: int = 64):
        import torch

        from whale_dist.model import load_encoder  # torch: paid by the actor, not by whoever imports this

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.encoder, self.card = load_encoder(model_url, self.device)
        self.autocast = autocast and self.device.type == "cuda"
        self.flip_tta, self.batch_size = flip_tta, batch_size

    @property
    def dim(self) -> int:
        return self.card.embedding_dim

    def embed_tensor(self, images) -> np.ndarray:
        """Float images (N, 3, S, S) in [0, 1] on any device -> (N, D) float32 numpy, L2-normalised."""
        import torch

        outputs = []
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            for start in range(0, len(images), self.batch_size):
                chunk = images[start:start + self.batch_size].to(self.device, non_blocking=True)
                vectors = self.encoder(chunk).float()
                if self.flip_tta:
                    vectors = vectors + self.encoder(chunk.flip(-1)).float()
                outputs.append(torch.nn.functional.normalize(vectors, dim=1).cpu())
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, self.dim), dtype=np.float32)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 photos (N, S, S, 3) as ``images.load_photo`` returns them -> (N, D) float32.

        The bytes go to the device as uint8 and become floats there (4x less to copy to a GPU); on CPU this is
        exactly ``images.to_tensor_batch``.
        """
        import torch

        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        return self.embed_tensor(pixels.permute(0, 3, 1, 2).float().div_(255.0))

    def __call__(self, batch: dict) -> dict:
        """A pipeline batch (``image`` or ``data`` + ``ok``) -> the same rows with ``embedding``, pixels dropped."""
        failpoint("embed.actor_batch", keys=[str(k) for k in batch["image_key"]])
        out = {k: v for k, v in batch.items() if k not in ("image", "data")}
        ok = np.asarray(batch["ok"], dtype=bool).copy()
        embedding = np.zeros((len(ok), self.dim), dtype=np.float32)
        if "data" in batch:  # GPU decode: bytes arrive undecoded

            tensor, failures = decode_on_device(batch["data"], batch["bbox"], ok, self.card.image_size, self.device)
            out["stage"], out["message"] = np.array(out["stage"], dtype=object), np.array(out["message"], dtype=object)
            for i, (stage, message) in failures.items():
                ok[i], out["stage"][i], out["message"][i] = False, stage, message
            if ok.any():
                embedding[ok] = self.embed_tensor(tensor[torch_index(ok)])
        elif ok.any():
            embedding[ok] = self.embed_images(batch["image"][ok])
        out["ok"], out["embedding"] = ok, embedding
        return out


def torch_index(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.flatnonzero(mask))
