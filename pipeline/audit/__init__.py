"""Auditing training labels: features and out-of-fold probabilities (features, as Ray tasks), confident learning
(confident_learning, NumPy only), the review page (report); job ties them together."""
