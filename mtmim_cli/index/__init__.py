"""Nearest-neighbour search over L2-normalised features (cosine = inner product): the exact
blocked scan (`exact.py`), FAISS indexes with their measured recall (`ann.py`), chosen by
gallery size. Numpy and faiss only: the gallery (deploy/) and the distractor protocol (eval/)
both search through it."""
