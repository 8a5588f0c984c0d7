"""The metrics library: one module per metric, each reproducing its published definition (cited in its docstring).

Plain functions on numpy arrays, for `v2m metrics` (cli.py), the evaluate stage and the studies' scripts:

    from pipeline.metrics.chroma import chroma_cosine, chroma_cosine_clip     # audiocraft chroma cosine
    from pipeline.metrics.av_align import av_align, video_peaks, peak_iou     # TempoTokens AV-Align (2025)
    from pipeline.metrics.kld import kld, kld_clip, label_distributions      # audiocraft KLD, any classifier
    from pipeline.metrics.fad import frechet_distance, fad, fad_from_embeddings  # FAD, any embedder
    from pipeline.metrics.rhythm import beat_f1, onset_f1, tempo_accuracy, estimate_key, key_accuracy
    from pipeline.metrics.models import load_passt, load_vggish               # local weights; torch imported lazily
    from pipeline.metrics.score import score_pair, clip_labels, Labels        # every model-free metric of one clip

Submodules are imported explicitly (nothing is re-exported here), so `pipeline.metrics.av_align` is always the
module and importing the package costs nothing.
"""
