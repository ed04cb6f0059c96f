"""Memories of feature rows that vote on a prediction: AdaNPC (labels of the nearest rows) and the
ReLoop2 error memory (the errors made near a sample), both over one cosine top-k vote (`knn`)."""
