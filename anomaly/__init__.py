"""The default anomaly score: fitted around a trained VAE and packed into its artifact.

`score.py` the score itself (its statistics, tails and calibration); `base.py` its parts that do not
depend on the VAE, shipped as models/score-base-v1.pth (vae-build-score-base); `fit.py` fits it into
an artifact (vae-fit-score); `ratio.py` and `glyph_pool.py` the glyphs-to-digits likelihood ratio
and the images it learns from; `suite.py` and `evaluate.py` the evaluation suite (vae-eval --ood).
The training program (training/) calls it at the end of a run; the service never imports it.
"""
