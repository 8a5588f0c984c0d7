"""Encoders: frames and text -> the model's conditioning streams. Nothing is re-exported here, so importing the
package costs nothing and each module's dependents are exactly the files they import.

    clip.py      CLIP image embeddings (open_clip; seeded init or pretrained weights)
    flow.py      optical flow reduced to a per-frame motion descriptor (OpenCV DIS / Farneback, ptlflow)
    streams.py   both video streams of a clip: frame sampling at k / fps and `Encoders`, built on first use (the
                 embed stage, and generation on any video)
    text.py      sentence embeddings of captions and prompts (all-MiniLM-L6-v2)
"""
