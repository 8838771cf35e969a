"""Analysis passes (moments, curvature, scores, select) annotate; transformation passes (replace,
fold) rewrite. `calibrate` is the one loop over the calibration data that feeds every analysis."""
