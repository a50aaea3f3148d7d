"""`ssau synth`: a synthetic AU corpus that ssau renders itself: AU-driven face geometry and coding (faces), the
classic and realistic styles, and the corpus writer (corpus)."""
